################################################################################
# General
################################################################################

variable "name" {
  description = "Name prefix of every resource (function, repository, file system, roles...), 2-24 characters."
  type        = string
  default     = "sd-lambda"
  nullable    = false

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
  nullable    = false

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

variable "weights_source" {
  description = "Where the function reads the model. \"efs\" (default): an EFS file system seeded from the weights bucket by the seeder (`make seed-models`); many models, new revisions and rollback without a rebuild. \"image\": baked into the function image (`make apply MODEL_DIR=...` or `MODEL=owner/name@rev`); no EFS, seeder or SSM endpoints, and no VPC unless vpc_enabled = true. docs/weights-in-image.md compares them."
  type        = string
  default     = "efs"
  nullable    = false

  validation {
    condition     = contains(["efs", "image"], var.weights_source)
    error_message = "weights_source must be \"efs\" or \"image\"."
  }
}

variable "vpc_enabled" {
  description = "Attach the function to a VPC (the new one, or vpc_id). Null (default): true with weights_source = \"efs\" (Lambda mounts EFS only inside a VPC; false is refused), false with \"image\" (the function then reaches S3 and the Lambda API, for jobs, at their public regional endpoints: no VPC, subnets or interface endpoints). True with \"image\" keeps a VPC, e.g. to reach private resources."
  type        = bool
  default     = null
}

variable "model_name" {
  description = "Slug of the served model under the EFS access point (MODEL_NAME), e.g. segmind--tiny-sd. Unused with weights_source = \"image\": the image sets MODEL_NAME to the model baked into it."
  type        = string
  default     = "segmind--tiny-sd"
  nullable    = false
}

variable "image_uri" {
  description = "Function image pinned by digest (<ecr_repository_url>@sha256:<digest>). Null: everything except the function, e.g. to create the repository first."
  type        = string
  default     = null
}

variable "architecture" {
  description = "Instruction set of the function image (x86_64 or arm64)."
  type        = string
  default     = "x86_64"
  nullable    = false
}

variable "memory_size" {
  description = "Function memory in MB, 128..10240 (CPU scales with it). New accounts are capped at 3008 until a quota increase."
  type        = number
  default     = 10240
  nullable    = false
}

variable "timeout" {
  description = "Function timeout in seconds (1..900)."
  type        = number
  default     = 900
  nullable    = false
}

variable "reserved_concurrency" {
  description = "Reserved concurrent executions, the cost cap: at most this many invocations run (and bill) at once, held for this function alone. Null (default): no reservation, so parallel (billed) invocations are capped only by the account's concurrency; AWS refuses a reservation that leaves fewer than 100 unreserved executions, which a new account (often 10 in total) cannot give."
  type        = number
  default     = null
}

variable "ephemeral_storage_size" {
  description = "Size of the function's /tmp in MB (512..10240)."
  type        = number
  default     = 512
  nullable    = false
}

variable "environment_variables" {
  description = "Handler tuning knobs passed to the function's environment (e.g. SD_MAX_STEPS). MODEL_ROOT and MODEL_NAME are set by the stack."
  type        = map(string)
  default     = {}
  nullable    = false
}

variable "log_retention_days" {
  description = "Retention of the function's and the flow logs' log groups, in days."
  type        = number
  default     = 365
  nullable    = false
}

variable "application_log_level" {
  description = "Lowest application log level Lambda keeps from the function's JSON logs (TRACE, DEBUG, INFO, WARN, ERROR, FATAL)."
  type        = string
  default     = "INFO"
  nullable    = false
}

variable "tracing_mode" {
  description = "X-Ray tracing mode of the function: Active (traces sampled requests; X-Ray charges per trace) or PassThrough."
  type        = string
  default     = "Active"
  nullable    = false
}

variable "create_alarms" {
  description = "Create CloudWatch alarms on the function's Errors, Throttles and Duration (near the timeout), notifying alarm_sns_topic_arn."
  type        = bool
  default     = false
  nullable    = false
}

variable "alarm_sns_topic_arn" {
  description = "SNS topic the alarms notify (create_alarms = true)."
  type        = string
  default     = null
}

variable "ecr_force_delete" {
  description = "Let `terraform destroy` delete the ECR repository with its images."
  type        = bool
  default     = false
  nullable    = false
}

variable "ecr_keep_images" {
  description = "How many git-<sha> images, and separately how many untagged images, the ECR lifecycle policy keeps; older ones expire unless ecr_keep_deployments keeps them."
  type        = number
  default     = 10
  nullable    = false
}

variable "ecr_keep_deployments" {
  description = "How many images tagged deployed-* by `sd-lambda deploy apply` (the digest the function runs) the ECR lifecycle policy keeps, by push time; they outrank the git-* and untagged counts, so the running image survives later pushes."
  type        = number
  default     = 3
  nullable    = false
}

variable "invoker_principals" {
  description = "IAM role/user ARNs or account ids allowed to call the function URL through the function's resource-based policy (lambda:InvokeFunctionUrl with AuthType AWS_IAM, lambda:InvokeFunction only through the URL), the grant AWS documents for function URLs. Empty: callers need an identity policy that allows both actions."
  type        = list(string)
  default     = []
  nullable    = false
}

################################################################################
# IAM
################################################################################

variable "iam_role_path" {
  description = "Path of the stack's IAM roles (function, seeder, flow logs) and the seeder's instance profile."
  type        = string
  default     = "/"
  nullable    = false
}

variable "iam_role_permissions_boundary_arn" {
  description = "Managed policy set as the permissions boundary of every IAM role of the stack. Null: none."
  type        = string
  default     = null
}

################################################################################
# Network
################################################################################

variable "vpc_id" {
  description = "Existing VPC to deploy into. Null: create a VPC with private subnets only (no NAT)."
  type        = string
  default     = null
}

variable "private_subnet_ids" {
  description = "Private subnets of the existing VPC, in at least two availability zones (vpc_id set). The first one hosts the seeder and the SSM endpoints."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "private_route_table_ids" {
  description = "Route tables of the existing private subnets that get the S3 gateway endpoint's route (vpc_id set and create_s3_endpoint = true only)."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "create_s3_endpoint" {
  description = "Existing VPC (vpc_id set) only: add an S3 gateway endpoint to private_route_table_ids, changing those route tables: every S3 request from their subnets, any workload's, then goes through the endpoint and its policy, no longer from a NAT's public address (aws:SourceIp bucket policies and egress firewalls stop matching). Keep it false if they already route S3 through an endpoint. False (default): the VPC must already reach S3. A new VPC always gets one."
  type        = bool
  default     = false
  nullable    = false
}

variable "s3_endpoint_policy" {
  description = "JSON policy of the S3 gateway endpoint. Null: in a new VPC, read access to the weights bucket and the Amazon Linux and SSM agent buckets only; in an existing VPC, AWS's default full access."
  type        = string
  default     = null
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the new VPC (vpc_id null)."
  type        = string
  default     = "10.42.0.0/16"
  nullable    = false
}

variable "az_count" {
  description = "Number of private subnets (one per availability zone) of the new VPC."
  type        = number
  default     = 2
  nullable    = false
}

variable "availability_zones" {
  description = "Availability zones of the new VPC's private subnets (vpc_id null), at least two. Empty: the region's first az_count zones."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "create_ssm_endpoints" {
  description = "Create the ssm, ssmmessages and ec2messages interface endpoints the seeder needs without internet access (about 22 USD/month). Disable if the VPC already has them or a NAT gateway."
  type        = bool
  default     = true
  nullable    = false
}

variable "seeder_https_egress_cidrs" {
  description = "Extra CIDRs (IPv4 up to /8, IPv6 up to /16 wide) the seeder may reach on 443, e.g. the VPC CIDR of existing SSM endpoints; required with create_ssm_endpoints = false."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "ssh_ingress_cidrs" {
  description = "CIDRs (IPv4 up to /8, IPv6 up to /16 wide) allowed to SSH to the seeder. Empty (default): no port 22 at all; use SSM Session Manager."
  type        = list(string)
  default     = []
  nullable    = false
}

variable "enable_flow_logs" {
  description = "Send flow logs of the new VPC to CloudWatch Logs."
  type        = bool
  default     = true
  nullable    = false
}

################################################################################
# Seeder
################################################################################

variable "create_seeder" {
  description = "Create the EC2 instance that copies weights from S3 to EFS (stopped between seeding runs by the seeding driver)."
  type        = bool
  default     = true
  nullable    = false
}

variable "seeder_instance_type" {
  description = "Instance type of the seeder."
  type        = string
  default     = "t3.small"
  nullable    = false
}

variable "seeder_architecture" {
  description = "CPU architecture of the seeder's Amazon Linux 2023 AMI; must match seeder_instance_type."
  type        = string
  default     = "x86_64"
  nullable    = false
}

variable "seeder_root_volume_size" {
  description = "Size of the seeder's encrypted gp3 root volume in GiB: room to stage the largest model before it is copied to EFS."
  type        = number
  default     = 20
  nullable    = false
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
  nullable    = false
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
  nullable    = false
}

################################################################################
# Jobs (POST /jobs, GET /jobs/{id}: docs/jobs.md)
################################################################################

variable "jobs_enabled" {
  description = "Serve POST /jobs and GET /jobs/{id}: long work runs in an asynchronous invocation of the function and its images land under jobs_prefix of the weights bucket (needs create_weights_bucket = true). Adds a Lambda API interface endpoint (about 7.5 USD/month), the function's S3 and self-invoke permissions and a lifecycle rule. False (default): /jobs answers jobs_disabled."
  type        = bool
  default     = false
  nullable    = false
}

variable "jobs_prefix" {
  description = "Key prefix of the job objects in the weights bucket; the function may read and write nothing else there."
  type        = string
  default     = "jobs/"
  nullable    = false
}

variable "jobs_expiration_days" {
  description = "Days after which a job's request, status and images expire from the bucket (a lifecycle rule); GET /jobs/{id} answers job_not_found after that."
  type        = number
  default     = 7
  nullable    = false
}

variable "jobs_url_ttl_seconds" {
  description = "Seconds a job image's presigned URL stays valid (60..3600); every GET /jobs/{id} signs new ones."
  type        = number
  default     = 900
  nullable    = false
}

variable "jobs_maximum_event_age_seconds" {
  description = "Seconds a job may wait in Lambda's asynchronous queue (throttled by the concurrency) before Lambda drops it and the job is reported expired (60..21600)."
  type        = number
  default     = 3600
  nullable    = false
}

variable "jobs_maximum_retry_attempts" {
  description = "Retries of a job's invocation that failed (0..2). The handler records every outcome itself, so only a timeout or running out of memory fails one; 0 (default) does not pay twice for what would most likely fail again."
  type        = number
  default     = 0
  nullable    = false
}
