variable "name" {
  description = "Name of the file system (creation token and Name tag)."
  type        = string
}

variable "region" {
  description = "Region where the resources are managed. Defaults to the region of the provider configuration."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags added to every taggable resource."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "subnets" {
  description = "Subnets that get a mount target (one per availability zone), keyed by a name known at plan time (the zone, or the subnet id), so adding or removing one never renumbers the others."
  type        = map(string)

  validation {
    condition     = length(var.subnets) >= 1
    error_message = "subnets needs at least one subnet."
  }
}

variable "security_group_ids" {
  description = "Security groups of the mount targets."
  type        = list(string)
}

variable "kms_key_arn" {
  description = "Customer managed KMS key for encryption at rest. Null: the AWS managed key aws/elasticfilesystem."
  type        = string
  default     = null
}

variable "access_point_path" {
  description = "Root directory of the access point; clients never see anything above it."
  type        = string
  default     = "/models"
  nullable    = false

  validation {
    condition     = can(regex("^(/[A-Za-z0-9._-]+)+$", var.access_point_path))
    error_message = "access_point_path must be an absolute path below /, e.g. /models (\"/\" itself is rejected)."
  }
}

variable "posix_uid" {
  description = "POSIX user id every access through the access point runs as, and owner of its root directory."
  type        = number
  default     = 1000
  nullable    = false
}

variable "posix_gid" {
  description = "POSIX group id every access through the access point runs as, and group of its root directory."
  type        = number
  default     = 1000
  nullable    = false
}

variable "root_permissions" {
  description = "Octal mode of the access point's root directory when EFS creates it."
  type        = string
  default     = "0755"
  nullable    = false

  validation {
    condition     = can(regex("^0?[0-7]{3}$", var.root_permissions))
    error_message = "root_permissions must be an octal mode such as 0755."
  }
}

variable "read_only_role_arns" {
  description = "IAM roles granted elasticfilesystem:ClientMount (read-only) through the access point, e.g. the function's role."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "read_write_role_arns" {
  description = "IAM roles granted ClientMount and ClientWrite through the access point, e.g. the seeder's role."
  type        = list(string)
  default     = []
  nullable    = false
}
