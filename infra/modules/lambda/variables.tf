variable "name" {
  description = "Name of the function, its IAM role, log group and (unless repository_name is set) ECR repository."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,36}$", var.name))
    error_message = "name must be 2-37 characters (the IAM role's name prefix is limited to 38): lowercase letters, digits and hyphens, starting with a letter."
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

################################################################################
# ECR
################################################################################

variable "repository_name" {
  description = "Name of the ECR repository. Null: the function name."
  type        = string
  default     = null
}

variable "repository_force_delete" {
  description = "Let `terraform destroy` delete the repository even when it still holds images."
  type        = bool
  default     = false
  nullable    = false
}

variable "repository_keep_images" {
  description = "How many git-<sha> images, and separately how many untagged images, the ECR lifecycle policy keeps; older ones expire unless the deployed-* rule keeps them."
  type        = number
  default     = 10
  nullable    = false

  validation {
    condition     = var.repository_keep_images >= 1 && var.repository_keep_images <= 1000
    error_message = "repository_keep_images must be between 1 and 1000."
  }
}

variable "repository_keep_deployments" {
  description = "How many deployed-* images (the tag `sd-lambda deploy apply` adds to the digest the function runs) the ECR lifecycle policy keeps, newest pushes first; its highest-priority rule, so the running image never expires by later pushes."
  type        = number
  default     = 3
  nullable    = false

  validation {
    condition     = var.repository_keep_deployments >= 1 && var.repository_keep_deployments <= 1000
    error_message = "repository_keep_deployments must be between 1 and 1000."
  }
}

variable "repository_kms_key_arn" {
  description = "Customer managed KMS key for the ECR repository. Null: KMS encryption with the AWS managed key aws/ecr."
  type        = string
  default     = null
}

################################################################################
# Function
################################################################################

variable "image_uri" {
  description = "Container image, pinned by digest: <account>.dkr.ecr.<region>.amazonaws.com/<repo>@sha256:<64 hex>. Null: everything but the function (first deployment stage)."
  type        = string
  default     = null

  validation {
    condition     = var.image_uri == null || can(regex("^[0-9]{12}\\.dkr\\.ecr\\.[a-z0-9-]+\\.amazonaws\\.com(\\.cn)?/[a-z0-9][a-z0-9._/-]*@sha256:[0-9a-f]{64}$", var.image_uri))
    error_message = "image_uri must be an ECR image pinned by digest (<repo-url>@sha256:<64 hex digits>); tags such as :latest are rejected because they can change under a deployed function."
  }
}

variable "architecture" {
  description = "Instruction set of the function; must match the image."
  type        = string
  default     = "x86_64"
  nullable    = false

  validation {
    condition     = contains(["x86_64", "arm64"], var.architecture)
    error_message = "architecture must be x86_64 or arm64."
  }
}

variable "memory_size" {
  description = "Memory of the function in MB (CPU scales with it; 10240 gives 6 vCPUs). New accounts are capped at 3008 until a quota increase."
  type        = number
  default     = 10240
  nullable    = false

  validation {
    condition     = var.memory_size >= 128 && var.memory_size <= 10240 && floor(var.memory_size) == var.memory_size
    error_message = "memory_size must be a whole number of MB between 128 and 10240."
  }
}

variable "timeout" {
  description = "Function timeout in seconds."
  type        = number
  default     = 900
  nullable    = false

  validation {
    condition     = var.timeout >= 1 && var.timeout <= 900 && floor(var.timeout) == var.timeout
    error_message = "timeout must be a whole number of seconds between 1 and 900."
  }
}

variable "reserved_concurrency" {
  description = "Reserved concurrent executions: at most this many invocations run, and bill, at once (the cost cap), and they are held for this function alone. Null (default): no reservation, so nothing caps parallel (billed) invocations but the account's concurrency; AWS refuses a reservation that leaves fewer than 100 unreserved executions, which a new account (often 10 in total) cannot give."
  type        = number
  default     = null

  validation {
    condition     = var.reserved_concurrency == null || try(var.reserved_concurrency >= 1 && var.reserved_concurrency <= 1000 && floor(var.reserved_concurrency) == var.reserved_concurrency, false)
    error_message = "reserved_concurrency must be null (no reservation) or a whole number between 1 and 1000."
  }
}

variable "ephemeral_storage_size" {
  description = "Size of /tmp in MB."
  type        = number
  default     = 512
  nullable    = false

  validation {
    condition     = var.ephemeral_storage_size >= 512 && var.ephemeral_storage_size <= 10240
    error_message = "ephemeral_storage_size must be between 512 and 10240 MB."
  }
}

variable "model_name" {
  description = "Model slug under the EFS access point (MODEL_NAME), e.g. segmind--tiny-sd."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]*$", var.model_name)) && !strcontains(var.model_name, "..")
    error_message = "model_name must be a slug (letters, digits, '.', '_', '-'; no '/' or '..'), e.g. segmind--tiny-sd."
  }
}

variable "local_mount_path" {
  description = "Where the function mounts the EFS access point (MODEL_ROOT). Lambda requires a path under /mnt/."
  type        = string
  default     = "/mnt/models"
  nullable    = false

  validation {
    condition     = can(regex("^/mnt/[A-Za-z0-9._-]+$", var.local_mount_path))
    error_message = "local_mount_path must be a directory directly under /mnt, e.g. /mnt/models."
  }
}

variable "environment_variables" {
  description = "Extra environment variables (the handler's tuning knobs). MODEL_ROOT and MODEL_NAME are set by the module."
  type        = map(string)
  default     = {}
  nullable    = false

  validation {
    condition     = alltrue([for key in keys(var.environment_variables) : can(regex("^[A-Za-z][A-Za-z0-9_]*$", key)) && !contains(["MODEL_ROOT", "MODEL_NAME"], key) && !startswith(key, "AWS_")])
    error_message = "environment_variables keys must be valid names, not MODEL_ROOT or MODEL_NAME (set by the module) and not AWS_* (reserved by Lambda)."
  }
}

variable "efs_enabled" {
  description = "Mount the model's EFS access point at local_mount_path and set MODEL_ROOT/MODEL_NAME. False: the model is baked into the image, whose own MODEL_ROOT/MODEL_NAME stand (needs no VPC)."
  type        = bool
  default     = true
  nullable    = false
}

variable "vpc_enabled" {
  description = "Attach the function to subnet_ids and security_group_ids. Must be true when efs_enabled is."
  type        = bool
  default     = true
  nullable    = false
}

variable "subnet_ids" {
  description = "Private subnets of the function's network interfaces (the EFS mount targets' subnets); vpc_enabled only."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "security_group_ids" {
  description = "Security groups of the function's network interfaces; vpc_enabled only."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "file_system_arn" {
  description = "ARN of the EFS file system (IAM permission to mount it); efs_enabled only."
  type        = string
  default     = null
}

variable "access_point_arn" {
  description = "ARN of the EFS access point the function mounts (efs_enabled only). Pass the efs module's output: it is ready only once the mount targets exist."
  type        = string
  default     = null
}

variable "kms_key_arn" {
  description = "Customer managed KMS key for the environment variables and the log group. Null: AWS managed encryption."
  type        = string
  default     = null
}

variable "log_retention_days" {
  description = "Retention of the function's log group, in days."
  type        = number
  default     = 365
  nullable    = false

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a CloudWatch Logs retention value (1, 3, 5, 7, 14, 30, 60, 90, ..., 365, ..., 3653)."
  }
}

variable "application_log_level" {
  description = "Lowest application log level Lambda keeps (JSON logging)."
  type        = string
  default     = "INFO"
  nullable    = false

  validation {
    condition     = contains(["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"], var.application_log_level)
    error_message = "application_log_level must be one of TRACE, DEBUG, INFO, WARN, ERROR, FATAL."
  }
}

variable "tracing_mode" {
  description = "X-Ray tracing mode of the function."
  type        = string
  default     = "Active"
  nullable    = false

  validation {
    condition     = contains(["Active", "PassThrough"], var.tracing_mode)
    error_message = "tracing_mode must be Active or PassThrough."
  }
}

variable "invoker_principals" {
  description = "Principals (IAM role/user ARNs or account ids) the function's resource-based policy lets call the function URL: lambda:InvokeFunctionUrl with AuthType AWS_IAM and lambda:InvokeFunction only through the URL, the grant AWS documents. Empty: callers rely on their identity policy (invoker_policy_json) alone."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for principal in var.invoker_principals : can(regex("^([0-9]{12}|arn:aws[a-z-]*:iam::[0-9]{12}:(root|(role|user)/.+))$", principal))])
    error_message = "invoker_principals must be 12-digit account ids or IAM role/user ARNs (arn:aws:iam::<account>:role/<name>)."
  }
}

################################################################################
# IAM role
################################################################################

variable "role_path" {
  description = "Path of the function's IAM role."
  type        = string
  default     = "/"
  nullable    = false

  validation {
    condition     = can(regex("^/([A-Za-z0-9+=,.@_-]+/)*$", var.role_path)) && length(var.role_path) <= 512
    error_message = "role_path must start and end with / (e.g. /sd-lambda/), at most 512 characters."
  }
}

variable "role_permissions_boundary_arn" {
  description = "Managed policy set as the permissions boundary of the function's IAM role. Null: none."
  type        = string
  default     = null

  validation {
    condition     = var.role_permissions_boundary_arn == null || can(regex("^arn:aws[a-z-]*:iam::([0-9]{12}|aws):policy/.+$", var.role_permissions_boundary_arn))
    error_message = "role_permissions_boundary_arn must be an IAM policy ARN (arn:aws:iam::<account>:policy/<name>)."
  }
}

################################################################################
# Alarms
################################################################################

variable "create_alarms" {
  description = "Create the Errors, Throttles and Duration alarms (needs alarm_sns_topic_arn). A separate flag because the topic ARN may only be known after apply."
  type        = bool
  default     = false
  nullable    = false
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

variable "duration_alarm_ratio" {
  description = "The Duration alarm fires when the maximum duration exceeds this fraction of the timeout."
  type        = number
  default     = 0.8
  nullable    = false

  validation {
    condition     = var.duration_alarm_ratio > 0 && var.duration_alarm_ratio < 1
    error_message = "duration_alarm_ratio must be between 0 and 1 (exclusive)."
  }
}

################################################################################
# Jobs (POST /jobs: asynchronous runs of this function, results in S3)
################################################################################

variable "jobs_enabled" {
  description = "Serve POST /jobs and GET /jobs/{id}: grant the function its jobs prefix of jobs_bucket_arn and its own asynchronous invocation, and configure that invocation. False: the handler answers /jobs with jobs_disabled."
  type        = bool
  default     = false
  nullable    = false
}

variable "jobs_bucket_arn" {
  description = "Bucket of the jobs' requests and results (SSE-KMS), required with jobs_enabled = true."
  type        = string
  default     = null

  validation {
    condition     = var.jobs_bucket_arn == null || can(regex("^arn:aws[a-z-]*:s3:::[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.jobs_bucket_arn))
    error_message = "jobs_bucket_arn must be an S3 bucket ARN (arn:aws:s3:::<bucket>)."
  }
}

variable "jobs_prefix" {
  description = "Key prefix of the job objects (SD_JOBS_PREFIX): the function may read and write nothing else of the bucket."
  type        = string
  default     = "jobs/"
  nullable    = false

  validation {
    condition     = can(regex("^([A-Za-z0-9._-]+/)+$", var.jobs_prefix))
    error_message = "jobs_prefix must be key segments ending in / (letters, digits, '.', '_', '-'), e.g. jobs/."
  }
}

variable "jobs_kms_key_arn" {
  description = "KMS key of the jobs bucket's SSE-KMS encryption; the function may use it only for objects of that bucket, through S3. Null: the bucket needs no customer managed key."
  type        = string
  default     = null

  validation {
    condition     = var.jobs_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", var.jobs_kms_key_arn))
    error_message = "jobs_kms_key_arn must be a KMS key ARN."
  }
}

variable "jobs_url_ttl" {
  description = "Seconds a result image's presigned URL stays valid (SD_JOBS_URL_TTL); each GET /jobs/{id} signs new ones. The function's credentials are temporary, and a URL never outlives the credentials that signed it, hence at most one hour."
  type        = number
  default     = 900
  nullable    = false

  validation {
    condition     = var.jobs_url_ttl >= 60 && var.jobs_url_ttl <= 3600 && floor(var.jobs_url_ttl) == var.jobs_url_ttl
    error_message = "jobs_url_ttl must be a whole number of seconds between 60 and 3600."
  }
}

variable "jobs_maximum_event_age" {
  description = "Seconds Lambda keeps a job's event queued before dropping it (maximum_event_age_in_seconds, 60..21600); the handler then reports the job expired."
  type        = number
  default     = 3600
  nullable    = false

  validation {
    condition     = var.jobs_maximum_event_age >= 60 && var.jobs_maximum_event_age <= 21600 && floor(var.jobs_maximum_event_age) == var.jobs_maximum_event_age
    error_message = "jobs_maximum_event_age must be a whole number of seconds between 60 and 21600."
  }
}

variable "jobs_maximum_retry_attempts" {
  description = "Retries Lambda makes when a job's invocation fails (0..2). The handler records every outcome itself, so only a timeout or running out of memory fails an invocation: 0 (default) does not pay twice for what would fail again."
  type        = number
  default     = 0
  nullable    = false

  validation {
    condition     = contains([0, 1, 2], var.jobs_maximum_retry_attempts)
    error_message = "jobs_maximum_retry_attempts must be 0, 1 or 2."
  }
}

variable "jobs_lambda_endpoint_url" {
  description = "https:// URL of the Lambda API interface endpoint the function starts its jobs through (SD_JOBS_LAMBDA_ENDPOINT). Null: the region's public endpoint, which needs a NAT."
  type        = string
  default     = null

  validation {
    condition     = var.jobs_lambda_endpoint_url == null || can(regex("^https://[a-z0-9.-]+$", var.jobs_lambda_endpoint_url))
    error_message = "jobs_lambda_endpoint_url must be an https:// URL without a path."
  }
}
