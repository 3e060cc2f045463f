variable "create" {
  description = "Create the seeder instance and its IAM role."
  type        = bool
  default     = true
  nullable    = false
}

variable "name" {
  description = "Name prefix of the instance and its IAM role."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,29}$", var.name))
    error_message = "name must be 2-30 characters (the IAM role's name prefix is limited to 38): lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  description = "Region where the resources are managed. Defaults to the region of the provider configuration."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags added to every taggable resource (including the root volume)."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "role_path" {
  description = "Path of the seeder's IAM role and instance profile."
  type        = string
  default     = "/"
  nullable    = false

  validation {
    condition     = can(regex("^/([A-Za-z0-9+=,.@_-]+/)*$", var.role_path)) && length(var.role_path) <= 512
    error_message = "role_path must start and end with / (e.g. /sd-lambda/), at most 512 characters."
  }
}

variable "role_permissions_boundary_arn" {
  description = "Managed policy set as the permissions boundary of the seeder's IAM role. Null: none."
  type        = string
  default     = null

  validation {
    condition     = var.role_permissions_boundary_arn == null || can(regex("^arn:aws[a-z-]*:iam::([0-9]{12}|aws):policy/.+$", var.role_permissions_boundary_arn))
    error_message = "role_permissions_boundary_arn must be an IAM policy ARN (arn:aws:iam::<account>:policy/<name>)."
  }
}

variable "subnet_id" {
  description = "Private subnet of the instance (the one with the SSM interface endpoints)."
  type        = string
}

variable "security_group_ids" {
  description = "Security groups of the instance."
  type        = list(string)
}

variable "instance_type" {
  description = "EC2 instance type. It only copies files from S3 to EFS, so small is enough."
  type        = string
  default     = "t3.small"
  nullable    = false
}

variable "architecture" {
  description = "CPU architecture of the Amazon Linux 2023 AMI; must match instance_type."
  type        = string
  default     = "x86_64"
  nullable    = false

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
  }
}

variable "ami_ssm_parameter" {
  description = "SSM parameter holding the AMI id. Null: the latest Amazon Linux 2023 AMI for the architecture."
  type        = string
  default     = null
}

variable "root_volume_size" {
  description = "Size of the encrypted gp3 root volume, in GiB (room to stage a model before copying it to EFS)."
  type        = number
  default     = 20
  nullable    = false

  validation {
    condition     = var.root_volume_size >= 8 && var.root_volume_size <= 1024
    error_message = "root_volume_size must be between 8 and 1024 GiB."
  }
}

variable "root_volume_kms_key_arn" {
  description = "Customer managed KMS key for the root volume. Null: the account's default EBS key."
  type        = string
  default     = null
}

variable "key_name" {
  description = "EC2 key pair for SSH. Null (default): no key pair; use SSM Session Manager."
  type        = string
  default     = null
}

variable "file_system_id" {
  description = "EFS file system mounted by the instance."
  type        = string
}

variable "file_system_arn" {
  description = "ARN of the EFS file system (IAM permissions)."
  type        = string
}

variable "access_point_id" {
  description = "EFS access point the instance mounts through."
  type        = string
}

variable "access_point_arn" {
  description = "ARN of the EFS access point (IAM condition)."
  type        = string
}

variable "mount_path" {
  description = "Where the access point is mounted on the instance."
  type        = string
  default     = "/mnt/models"
  nullable    = false

  validation {
    condition     = can(regex("^/mnt/[A-Za-z0-9._-]+$", var.mount_path))
    error_message = "mount_path must be a directory directly under /mnt, e.g. /mnt/models."
  }
}

variable "weights_bucket_arn" {
  description = "ARN of the S3 bucket holding the weights the instance copies to EFS."
  type        = string
}

variable "weights_prefix" {
  description = "Key prefix of the weights in the bucket; the instance can read nothing else."
  type        = string
  default     = "models/"
  nullable    = false

  validation {
    condition     = can(regex("^[A-Za-z0-9._-]+/$", var.weights_prefix))
    error_message = "weights_prefix must be a single key prefix ending in /, e.g. models/."
  }
}

variable "weights_kms_key_arn" {
  description = "KMS key encrypting the weights bucket, if a customer managed one (grants kms:Decrypt)."
  type        = string
  default     = null
}
