variable "name" {
  description = "Name prefix for every resource of the network."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,26}$", var.name))
    error_message = "name must be 2-27 characters (the flow-log role's name prefix is limited to 38): lowercase letters, digits and hyphens, starting with a letter."
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

variable "create_vpc" {
  description = "Create a new VPC with private subnets. When false, vpc_id and private_subnet_ids describe an existing VPC."
  type        = bool
  default     = true
  nullable    = false
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the new VPC (create_vpc = true)."
  type        = string
  default     = "10.42.0.0/16"
  nullable    = false

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr)) && tonumber(split("/", var.vpc_cidr)[1]) <= 24
    error_message = "vpc_cidr must be an IPv4 CIDR block of size /24 or larger, e.g. 10.42.0.0/16."
  }
}

variable "availability_zones" {
  description = "Availability zones for the new private subnets, at least two. Empty: the first az_count zones of the region."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = length(var.availability_zones) == 0 || (length(var.availability_zones) >= 2 && length(distinct(var.availability_zones)) == length(var.availability_zones) && alltrue([for zone in var.availability_zones : can(regex("^[a-z]{2}(-[a-z]+)+-[0-9][a-z]$", zone))]))
    error_message = "availability_zones must be empty or at least two distinct zone names such as eu-west-1a (EFS and Lambda need two zones)."
  }
}

variable "az_count" {
  description = "Number of private subnets (one per availability zone) in a new VPC."
  type        = number
  default     = 2
  nullable    = false

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 6
    error_message = "az_count must be between 2 and 6 (EFS mount targets and Lambda need at least two zones)."
  }
}

variable "vpc_id" {
  description = "Existing VPC id (create_vpc = false)."
  type        = string
  default     = null

  validation {
    condition     = var.vpc_id == null || can(regex("^vpc-[0-9a-f]{8,17}$", var.vpc_id))
    error_message = "vpc_id must look like vpc-0123456789abcdef0."
  }
}

variable "private_subnet_ids" {
  description = "Existing private subnet ids in at least two availability zones (create_vpc = false)."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for id in var.private_subnet_ids : can(regex("^subnet-[0-9a-f]{8,17}$", id))])
    error_message = "private_subnet_ids must look like subnet-0123456789abcdef0."
  }
}

variable "private_route_table_ids" {
  description = "Route tables of the existing private subnets that get the S3 gateway endpoint's route (create_vpc = false and create_s3_endpoint = true only)."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for id in var.private_route_table_ids : can(regex("^rtb-[0-9a-f]{8,17}$", id))])
    error_message = "private_route_table_ids must look like rtb-0123456789abcdef0."
  }
}

variable "create_s3_endpoint" {
  description = "Existing VPC only: add an S3 gateway endpoint (free) to private_route_table_ids. This changes those route tables: every S3 request from their subnets, any workload's, then goes through the endpoint and its policy, and no longer comes from a NAT's public address (aws:SourceIp bucket policies and egress firewalls stop matching). Keep it false if they already route S3 through an endpoint. A new VPC always gets one, its only way to S3."
  type        = bool
  default     = false
  nullable    = false
}

variable "s3_endpoint_policy" {
  description = "JSON policy of the S3 gateway endpoint. Null: in a new VPC, read access to s3_endpoint_bucket_arns and the Amazon Linux and SSM agent buckets only; in an existing VPC, AWS's default full access."
  type        = string
  default     = null

  validation {
    condition     = var.s3_endpoint_policy == null || can(jsondecode(var.s3_endpoint_policy).Statement)
    error_message = "s3_endpoint_policy must be a JSON IAM policy document with a Statement."
  }
}

variable "s3_endpoint_bucket_arns" {
  description = "Buckets the S3 gateway endpoint of a new VPC may read (with the AL2023 repository and SSM agent buckets) when s3_endpoint_policy is null. Empty: the endpoint's default full-access policy. Ignored for an existing VPC."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for arn in var.s3_endpoint_bucket_arns : can(regex("^arn:aws[a-z-]*:s3:::[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", arn))])
    error_message = "s3_endpoint_bucket_arns must be S3 bucket ARNs (arn:aws:s3:::<bucket>)."
  }
}

variable "s3_endpoint_write_object_arns" {
  description = "Object ARNs (arn:aws:s3:::<bucket>/<prefix>*) the S3 gateway endpoint of a new VPC also lets through s3:PutObject for (the function's jobs) when s3_endpoint_policy is null. Ignored for an existing VPC."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for arn in var.s3_endpoint_write_object_arns : can(regex("^arn:aws[a-z-]*:s3:::[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+$", arn))])
    error_message = "s3_endpoint_write_object_arns must be S3 object ARNs (arn:aws:s3:::<bucket>/<prefix>*)."
  }
}

variable "lambda_s3_egress" {
  description = "Let the function's security group reach S3 on 443 (the S3 prefix list): the function reads and writes its jobs' objects."
  type        = bool
  default     = false
  nullable    = false
}

variable "create_lambda_endpoint" {
  description = "Create a Lambda API interface endpoint (no private DNS, in the first private subnet) that only the function's security group may reach, so the function can start its own asynchronous invocations without a NAT (about 7.5 USD/month per endpoint in one zone)."
  type        = bool
  default     = false
  nullable    = false
}

variable "lambda_endpoint_function_arns" {
  description = "Functions the Lambda interface endpoint's policy lets lambda:InvokeFunction reach (create_lambda_endpoint = true)."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for arn in var.lambda_endpoint_function_arns : can(regex("^arn:aws[a-z-]*:lambda:[a-z0-9-]+:[0-9]{12}:function:[A-Za-z0-9_-]+$", arn))])
    error_message = "lambda_endpoint_function_arns must be unqualified Lambda function ARNs."
  }
}

variable "efs_enabled" {
  description = "Create the EFS mount targets' and the seeder's security groups and their rules. False (weights in the function image): the function's group only, with the jobs' egress if any."
  type        = bool
  default     = true
  nullable    = false
}

variable "create_ssm_endpoints" {
  description = "Create ssm, ssmmessages and ec2messages interface endpoints (in the seeder's subnet) so SSM reaches the seeder without internet access. Disable when the VPC already has them or a NAT."
  type        = bool
  default     = true
  nullable    = false
}

variable "seeder_https_egress_cidrs" {
  description = "Extra CIDRs (IPv4 up to /8, IPv6 up to /16 wide) the seeder may reach on 443, e.g. the VPC CIDR of existing SSM endpoints; required with create_ssm_endpoints = false."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for cidr in var.seeder_https_egress_cidrs : can(cidrsubnet(cidr, 0, 0)) && try(cidrsubnet(cidr, 0, 0) == cidr && tonumber(split("/", cidr)[1]) >= (strcontains(cidr, ":") ? 16 : 8), false)])
    error_message = "seeder_https_egress_cidrs must be canonical CIDR blocks (host bits zero, e.g. 203.0.113.0/24) of at most /8 (IPv4) or /16 (IPv6) in size: 0.0.0.0/0 and ::/0 are rejected, and so are wide ranges that add up to them."
  }
}

variable "ssh_ingress_cidrs" {
  description = "CIDRs (IPv4 up to /8, IPv6 up to /16 wide) allowed to reach the seeder on port 22. Empty (default): no SSH; use SSM Session Manager."
  type        = list(string)
  default     = []
  nullable    = false

  validation {
    condition     = alltrue([for cidr in var.ssh_ingress_cidrs : can(cidrsubnet(cidr, 0, 0)) && try(cidrsubnet(cidr, 0, 0) == cidr && tonumber(split("/", cidr)[1]) >= (strcontains(cidr, ":") ? 16 : 8), false)])
    error_message = "ssh_ingress_cidrs must be canonical CIDR blocks (host bits zero, e.g. 203.0.113.0/24) of at most /8 (IPv4) or /16 (IPv6) in size: 0.0.0.0/0 and ::/0 are rejected, and so are wide ranges that add up to them."
  }
}

variable "enable_flow_logs" {
  description = "Send VPC flow logs of a new VPC to a CloudWatch log group."
  type        = bool
  default     = true
  nullable    = false
}

variable "flow_log_retention_days" {
  description = "Retention of the flow log group, in days."
  type        = number
  default     = 365
  nullable    = false

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.flow_log_retention_days)
    error_message = "flow_log_retention_days must be a CloudWatch Logs retention value (1, 3, 5, 7, 14, 30, 60, 90, ..., 365, ..., 3653)."
  }
}

variable "kms_key_arn" {
  description = "KMS key for the flow log group. Null: CloudWatch Logs' default encryption."
  type        = string
  default     = null
}

variable "role_path" {
  description = "Path of the flow logs' IAM role."
  type        = string
  default     = "/"
  nullable    = false

  validation {
    condition     = can(regex("^/([A-Za-z0-9+=,.@_-]+/)*$", var.role_path)) && length(var.role_path) <= 512
    error_message = "role_path must start and end with / (e.g. /sd-lambda/), at most 512 characters."
  }
}

variable "role_permissions_boundary_arn" {
  description = "Managed policy set as the permissions boundary of the flow logs' IAM role. Null: none."
  type        = string
  default     = null

  validation {
    condition     = var.role_permissions_boundary_arn == null || can(regex("^arn:aws[a-z-]*:iam::([0-9]{12}|aws):policy/.+$", var.role_permissions_boundary_arn))
    error_message = "role_permissions_boundary_arn must be an IAM policy ARN (arn:aws:iam::<account>:policy/<name>)."
  }
}
