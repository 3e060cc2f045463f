################################################################################
# General
################################################################################

variable "name" {
  description = "Name prefix of every resource (function, repository, file system, roles...), 2-24 characters."
  type        = string
  default     = "sd-lambda"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,23}$", var.name))
    error_message = "name must be 2-24 characters (it prefixes IAM role and bucket names, which AWS limits): lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  description = "AWS region of the stack. Null: the region of the provider configuration (AWS_REGION / profile)."
  type        = string
  default     = null

  validation {
    condition     = var.region == null || can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "tags" {
  description = "Tags added to every taggable resource of the stack."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for key in keys(var.tags) : !startswith(lower(key), "aws:")])
    error_message = "Tag keys must not start with aws: (reserved by AWS)."
  }
}

variable "kms_key_arn" {
  description = "Customer managed KMS key for EFS, the weights bucket, the function's environment and the log groups. Null: the stack creates one (about 1 USD/month)."
  type        = string
  default     = null

  validation {
    condition     = var.kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", var.kms_key_arn))
    error_message = "kms_key_arn must be a KMS key ARN (arn:aws:kms:<region>:<account>:key/<id>)."
  }
}

################################################################################
# Model and function
################################################################################

variable "model_name" {
  description = "Slug of the served model under the EFS access point (MODEL_NAME), e.g. segmind--tiny-sd."
  type        = string
  default     = "segmind--tiny-sd"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]*$", var.model_name)) && !strcontains(var.model_name, "..")
    error_message = "model_name must be a slug (letters, digits, '.', '_', '-'; no '/' or '..'), e.g. segmind--tiny-sd."
  }
}

variable "image_uri" {
  description = "Function image pinned by digest (<ecr_repository_url>@sha256:<digest>). Null: everything except the function, e.g. to create the repository first."
  type        = string
  default     = null

  validation {
    condition     = var.image_uri == null || can(regex("^[0-9]{12}\\.dkr\\.ecr\\.[a-z0-9-]+\\.amazonaws\\.com(\\.cn)?/[a-z0-9][a-z0-9._/-]*@sha256:[0-9a-f]{64}$", var.image_uri))
    error_message = "image_uri must be an ECR image pinned by digest (<repo-url>@sha256:<64 hex digits>); tags such as :latest are rejected because they can change under a deployed function."
  }
}

variable "architecture" {
  description = "Instruction set of the function image (x86_64 or arm64)."
  type        = string
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
  }
}

variable "memory_size" {
  description = "Function memory in MB, 128..10240 (CPU scales with it). New accounts are capped at 3008 until a quota increase."
  type        = number
  default     = 10240

  validation {
    condition     = var.memory_size >= 128 && var.memory_size <= 10240 && floor(var.memory_size) == var.memory_size
    error_message = "memory_size must be a whole number of MB between 128 and 10240."
  }
}

variable "timeout" {
  description = "Function timeout in seconds (1..900)."
  type        = number
  default     = 900

  validation {
    condition     = var.timeout >= 1 && var.timeout <= 900 && floor(var.timeout) == var.timeout
    error_message = "timeout must be a whole number of seconds between 1 and 900."
  }
}

variable "reserved_concurrency" {
  description = "Reserved concurrent executions: the cost cap (at most this many invocations run, and bill, at once)."
  type        = number
  default     = 2

  validation {
    condition     = var.reserved_concurrency >= 1 && var.reserved_concurrency <= 1000 && floor(var.reserved_concurrency) == var.reserved_concurrency
    error_message = "reserved_concurrency must be a whole number between 1 and 1000."
  }
}

variable "ephemeral_storage_size" {
  description = "Size of the function's /tmp in MB (512..10240)."
  type        = number
  default     = 512

  validation {
    condition     = var.ephemeral_storage_size >= 512 && var.ephemeral_storage_size <= 10240
    error_message = "ephemeral_storage_size must be between 512 and 10240 MB."
  }
}

variable "environment_variables" {
  description = "Handler tuning knobs passed to the function's environment (e.g. SD_MAX_STEPS). MODEL_ROOT and MODEL_NAME are set by the stack."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for key in keys(var.environment_variables) : can(regex("^[A-Za-z][A-Za-z0-9_]*$", key)) && !contains(["MODEL_ROOT", "MODEL_NAME"], key) && !startswith(key, "AWS_")])
    error_message = "environment_variables keys must be valid names, not MODEL_ROOT or MODEL_NAME (set by the stack) and not AWS_* (reserved by Lambda)."
  }
}

variable "log_retention_days" {
  description = "Retention of the function's and the flow logs' log groups, in days."
  type        = number
  default     = 365

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a CloudWatch Logs retention value (1, 3, 5, 7, 14, 30, 60, 90, ..., 365, ..., 3653)."
  }
}

variable "create_alarms" {
  description = "Create CloudWatch alarms on the function's Errors, Throttles and Duration (near the timeout), notifying alarm_sns_topic_arn."
  type        = bool
  default     = false
}

variable "alarm_sns_topic_arn" {
  description = "SNS topic the alarms notify (create_alarms = true)."
  type        = string
  default     = null

  validation {
    condition     = var.alarm_sns_topic_arn == null || can(regex("^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_.-]+$", var.alarm_sns_topic_arn))
    error_message = "alarm_sns_topic_arn must be an SNS topic ARN."
  }
}

variable "ecr_force_delete" {
  description = "Let `terraform destroy` delete the ECR repository with its images."
  type        = bool
  default     = false
}

variable "ecr_keep_images" {
  description = "How many untagged images the ECR lifecycle policy keeps (older untagged ones expire). Tagged images, such as the git-<sha> images the function runs, never expire."
  type        = number
  default     = 10

  validation {
    condition     = var.ecr_keep_images >= 1 && var.ecr_keep_images <= 1000
    error_message = "ecr_keep_images must be between 1 and 1000."
  }
}

################################################################################
# Network
################################################################################

variable "vpc_id" {
  description = "Existing VPC to deploy into. Null: create a VPC with private subnets only (no NAT)."
  type        = string
  default     = null

  validation {
    condition     = var.vpc_id == null || can(regex("^vpc-[0-9a-f]{8,17}$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "private_subnet_ids" {
  description = "Private subnets of the existing VPC, in at least two availability zones (vpc_id set). The first one hosts the seeder and the SSM endpoints."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.private_subnet_ids : can(regex("^subnet-[0-9a-f]{8,17}$", id))])
    error_message = "private_subnet_ids must look like subnet-0123456789abcdef0."
  }
}

variable "private_route_table_ids" {
  description = "Route tables of the existing private subnets, to attach the S3 gateway endpoint (vpc_id set). Empty: the VPC must already reach S3."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for id in var.private_route_table_ids : can(regex("^rtb-[0-9a-f]{8,17}$", id))])
    error_message = "private_route_table_ids must look like rtb-0123456789abcdef0."
  }
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the new VPC (vpc_id null)."
  type        = string
  default     = "10.42.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr)) && tonumber(split("/", var.vpc_cidr)[1]) <= 24
    error_message = "vpc_cidr must be an IPv4 CIDR block of size /24 or larger, e.g. 10.42.0.0/16."
  }
}

variable "az_count" {
  description = "Number of private subnets (one per availability zone) of the new VPC."
  type        = number
  default     = 2

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 6
    error_message = "az_count must be between 2 and 6."
  }
}

variable "create_ssm_endpoints" {
  description = "Create the ssm, ssmmessages and ec2messages interface endpoints the seeder needs without internet access (about 22 USD/month). Disable if the VPC already has them or a NAT gateway."
  type        = bool
  default     = true
}

variable "seeder_https_egress_cidrs" {
  description = "Extra CIDRs (IPv4 up to /8, IPv6 up to /16 wide) the seeder may reach on 443, e.g. the VPC CIDR of existing SSM endpoints; required with create_ssm_endpoints = false."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for cidr in var.seeder_https_egress_cidrs : can(cidrsubnet(cidr, 0, 0)) && try(cidrsubnet(cidr, 0, 0) == cidr && tonumber(split("/", cidr)[1]) >= (strcontains(cidr, ":") ? 16 : 8), false)])
    error_message = "seeder_https_egress_cidrs must be canonical CIDR blocks (host bits zero, e.g. 203.0.113.0/24) of at most /8 (IPv4) or /16 (IPv6) in size: 0.0.0.0/0 and ::/0 are rejected, and so are wide ranges that add up to them."
  }
}

variable "ssh_ingress_cidrs" {
  description = "CIDRs (IPv4 up to /8, IPv6 up to /16 wide) allowed to SSH to the seeder. Empty (default): no port 22 at all; use SSM Session Manager."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for cidr in var.ssh_ingress_cidrs : can(cidrsubnet(cidr, 0, 0)) && try(cidrsubnet(cidr, 0, 0) == cidr && tonumber(split("/", cidr)[1]) >= (strcontains(cidr, ":") ? 16 : 8), false)])
    error_message = "ssh_ingress_cidrs must be canonical CIDR blocks (host bits zero, e.g. 203.0.113.0/24) of at most /8 (IPv4) or /16 (IPv6) in size: 0.0.0.0/0 and ::/0 are rejected, and so are wide ranges that add up to them."
  }
}

variable "enable_flow_logs" {
  description = "Send flow logs of the new VPC to CloudWatch Logs."
  type        = bool
  default     = true
}

################################################################################
# Seeder
################################################################################

variable "create_seeder" {
  description = "Create the EC2 instance that copies weights from S3 to EFS (stopped between seeding runs by the seeding driver)."
  type        = bool
  default     = true
}

variable "seeder_instance_type" {
  description = "Instance type of the seeder."
  type        = string
  default     = "t3.small"
}

variable "seeder_architecture" {
  description = "CPU architecture of the seeder's Amazon Linux 2023 AMI; must match seeder_instance_type."
  type        = string
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.seeder_architecture)
    error_message = "seeder_architecture must be x86_64 or arm64."
  }
}

variable "seeder_key_name" {
  description = "EC2 key pair of the seeder. Null (default): none; SSM Session Manager is the way in."
  type        = string
  default     = null
}

################################################################################
# Weights bucket
################################################################################

variable "create_weights_bucket" {
  description = "Create the S3 bucket the seeder reads weights from. When false, weights_bucket_name names an existing bucket."
  type        = bool
  default     = true
}

variable "weights_bucket_name" {
  description = "Existing bucket (create_weights_bucket = false) or exact name of the new one. Null: a generated unique name."
  type        = string
  default     = null
}

variable "weights_bucket_kms_key_arn" {
  description = "Customer managed KMS key of an existing weights bucket, if any (the seeder gets kms:Decrypt on it)."
  type        = string
  default     = null
}

variable "weights_bucket_force_destroy" {
  description = "Let `terraform destroy` delete the created bucket with the weights in it."
  type        = bool
  default     = false
}
