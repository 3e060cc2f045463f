variable "create" {
  description = "Create the bucket. When false, bucket_name names an existing bucket and nothing is created."
  type        = bool
  default     = true
  nullable    = false
}

variable "bucket_name" {
  description = "Bucket name: the existing bucket (create = false) or the new bucket's exact name. Null with create = true: a unique name from bucket_prefix."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, '.', '-')."
  }
}

variable "bucket_prefix" {
  description = "Prefix of the generated bucket name (create = true, bucket_name = null)."
  type        = string
  default     = "sd-lambda-weights-"
  nullable    = false

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{0,36}$", var.bucket_prefix))
    error_message = "bucket_prefix must be at most 37 lowercase letters, digits, '.' or '-'."
  }
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

variable "kms_key_arn" {
  description = "Customer managed KMS key for default encryption (SSE-KMS with a bucket key). Null: SSE-KMS with the AWS managed key aws/s3."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Let `terraform destroy` delete the bucket with the weights still in it."
  type        = bool
  default     = false
  nullable    = false
}

variable "noncurrent_version_expiration_days" {
  description = "Days after which overwritten or deleted object versions are removed."
  type        = number
  default     = 30
  nullable    = false

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "expiring_prefix" {
  description = "Key prefix whose objects expire after expiring_prefix_days (the jobs' results), e.g. jobs/. Null: no such rule."
  type        = string
  default     = null

  validation {
    condition     = var.expiring_prefix == null || can(regex("^([A-Za-z0-9._-]+/)+$", var.expiring_prefix))
    error_message = "expiring_prefix must be key segments ending in / (letters, digits, '.', '_', '-'), e.g. jobs/."
  }
}

variable "expiring_prefix_days" {
  description = "Days after which objects under expiring_prefix expire (their old versions go one day later)."
  type        = number
  default     = 7
  nullable    = false

  validation {
    condition     = var.expiring_prefix_days >= 1 && var.expiring_prefix_days <= 3650 && floor(var.expiring_prefix_days) == var.expiring_prefix_days
    error_message = "expiring_prefix_days must be a whole number of days between 1 and 3650."
  }
}
