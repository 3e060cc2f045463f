# sd-lambda: a text-to-image Lambda function behind an IAM-authenticated function URL, with the model
# weights on EFS, seeded from S3 by a private EC2 instance (weights_source = "efs"), or baked into the
# function image (weights_source = "image": no EFS, no seeder, by default no VPC). No provider block: this
# directory is both the deployable stack (`make apply`) and a module other stacks call (see examples/).

locals {
  # Fixed by the contract between the seeding driver, the seeder and the handler.
  mount_path     = "/mnt/models"
  weights_prefix = "models/"

  tags = merge({ "sd-lambda:stack" = var.name }, var.tags)

  # The one place the weights source turns into what exists: EFS (its security groups, mount targets,
  # seeder and SSM endpoints) only for "efs"; a VPC whenever EFS is used, otherwise only when asked for.
  weights_on_efs = var.weights_source == "efs"
  vpc_enabled    = var.vpc_enabled == null ? local.weights_on_efs : var.vpc_enabled
  create_seeder  = local.weights_on_efs && var.create_seeder

  create_kms_key = var.kms_key_arn == null
  kms_key_arn    = local.create_kms_key ? aws_kms_key.this[0].arn : var.kms_key_arn

  # Built from the name, as the lambda module does: the network's endpoint policy names the function
  # before it exists.
  function_arn = "arn:${data.aws_partition.current.partition}:lambda:${data.aws_region.current.region}:${data.aws_caller_identity.current.account_id}:function:${var.name}"
}

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

data "aws_region" "current" {
  region = var.region

  # A check across variables lives on this always-present object: before Terraform 1.9 a validation
  # block may only refer to its own variable. (The weights bucket module checks its own inputs.)
  lifecycle {
    precondition {
      condition     = local.vpc_enabled || !local.weights_on_efs
      error_message = "weights_source = \"efs\" needs vpc_enabled = true (or null): Lambda mounts EFS only from subnets of a VPC. Set weights_source = \"image\" to run the function outside a VPC."
    }

    precondition {
      condition     = local.vpc_enabled || (var.vpc_id == null && length(var.private_subnet_ids) == 0)
      error_message = "vpc_id / private_subnet_ids are set but the function runs outside a VPC (weights_source = \"image\" with vpc_enabled null or false): set vpc_enabled = true to attach it to that VPC, or drop them."
    }

    precondition {
      condition     = !local.create_seeder || var.create_ssm_endpoints || length(var.seeder_https_egress_cidrs) > 0
      error_message = "The seeder is only reachable through SSM: with create_ssm_endpoints = false, set seeder_https_egress_cidrs to where the VPC's existing SSM endpoints (or NAT path) are, or set create_seeder = false."
    }

    precondition {
      condition     = !var.jobs_enabled || var.create_weights_bucket
      error_message = "jobs_enabled = true keeps the jobs in the weights bucket the stack creates (its lifecycle rule expires them): it needs create_weights_bucket = true."
    }
  }
}

################################################################################
# Encryption key
################################################################################

resource "aws_kms_key" "this" {
  count = local.create_kms_key ? 1 : 0

  region                  = var.region
  description             = "${var.name}: EFS, weights bucket, function environment and logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  # A key policy always applies to "this key", hence Resource "*". The account statement delegates
  # access to IAM policies (the function and seeder roles get kms:Decrypt there); CloudWatch Logs needs
  # its own statement to encrypt the stack's log groups, CloudWatch alarms one to publish to SNS topics
  # encrypted with this key.
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministration"
        Effect    = "Allow"
        Principal = { AWS = "arn:${data.aws_partition.current.partition}:iam::${data.aws_caller_identity.current.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        # Alarms publishing to an SNS topic encrypted with this key (the AWS managed aws/sns key cannot
        # grant CloudWatch this, so such a topic would never receive the alarms).
        # aws:SourceAccount: only alarms of this account (confused-deputy guard), which CloudWatch supplies
        # for this grant. https://docs.aws.amazon.com/sns/latest/dg/sns-key-management.html#compatibility-with-aws-services
        Sid       = "CloudWatchAlarmsToEncryptedTopics"
        Effect    = "Allow"
        Principal = { Service = "cloudwatch.amazonaws.com" }
        Action    = ["kms:Decrypt", "kms:GenerateDataKey*"]
        Resource  = "*"
        Condition = {
          StringEquals = { "aws:SourceAccount" = data.aws_caller_identity.current.account_id }
        }
      },
      {
        Sid       = "CloudWatchLogsForThisAccount"
        Effect    = "Allow"
        Principal = { Service = "logs.${data.aws_region.current.region}.amazonaws.com" }
        Action    = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
        Resource  = "*"
        Condition = {
          ArnLike = {
            "kms:EncryptionContext:aws:logs:arn" = "arn:${data.aws_partition.current.partition}:logs:${data.aws_region.current.region}:${data.aws_caller_identity.current.account_id}:log-group:*"
          }
        }
      },
    ]
  })

  tags = merge(local.tags, { Name = var.name })
}

resource "aws_kms_alias" "this" {
  count = local.create_kms_key ? 1 : 0

  region        = var.region
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.this[0].key_id
}

################################################################################
# Modules
################################################################################

module "network" {
  source = "./modules/network"
  count  = local.vpc_enabled ? 1 : 0

  name   = var.name
  region = var.region
  tags   = local.tags

  create_vpc              = var.vpc_id == null
  vpc_cidr                = var.vpc_cidr
  az_count                = var.az_count
  availability_zones      = var.availability_zones
  vpc_id                  = var.vpc_id
  private_subnet_ids      = var.private_subnet_ids
  private_route_table_ids = var.private_route_table_ids
  create_s3_endpoint      = var.create_s3_endpoint
  s3_endpoint_policy      = var.s3_endpoint_policy

  efs_enabled               = local.weights_on_efs
  create_ssm_endpoints      = local.weights_on_efs && var.create_ssm_endpoints
  seeder_https_egress_cidrs = var.seeder_https_egress_cidrs
  s3_endpoint_bucket_arns   = [module.weights_bucket.bucket_arn]
  ssh_ingress_cidrs         = var.ssh_ingress_cidrs

  # Jobs: the function writes its prefix of the weights bucket and starts its own invocations.
  s3_endpoint_write_object_arns = var.jobs_enabled ? ["${module.weights_bucket.bucket_arn}/${var.jobs_prefix}*"] : []
  lambda_s3_egress              = var.jobs_enabled
  create_lambda_endpoint        = var.jobs_enabled
  lambda_endpoint_function_arns = var.jobs_enabled ? [local.function_arn] : []

  enable_flow_logs        = var.enable_flow_logs
  flow_log_retention_days = var.log_retention_days
  kms_key_arn             = local.kms_key_arn

  role_path                     = var.iam_role_path
  role_permissions_boundary_arn = var.iam_role_permissions_boundary_arn
}

module "weights_bucket" {
  source = "./modules/weights_bucket"

  create        = var.create_weights_bucket
  bucket_name   = var.weights_bucket_name
  bucket_prefix = "${var.name}-weights-"
  region        = var.region
  tags          = local.tags
  kms_key_arn   = local.kms_key_arn
  force_destroy = var.weights_bucket_force_destroy

  expiring_prefix      = var.jobs_enabled ? var.jobs_prefix : null
  expiring_prefix_days = var.jobs_expiration_days
}

module "efs" {
  source = "./modules/efs"
  count  = local.weights_on_efs ? 1 : 0

  name               = "${var.name}-models"
  region             = var.region
  tags               = local.tags
  subnets            = module.network[0].private_subnets_by_key
  security_group_ids = [module.network[0].efs_security_group_id]
  kms_key_arn        = local.kms_key_arn
  access_point_path  = "/models"

  read_only_role_arns  = [module.lambda.role_arn]
  read_write_role_arns = local.create_seeder ? [module.seeder.role_arn] : []
}

module "seeder" {
  source = "./modules/seeder"

  create             = local.create_seeder
  name               = var.name
  region             = var.region
  tags               = local.tags
  subnet_id          = try(module.network[0].private_subnet_ids[0], null)
  security_group_ids = compact([try(module.network[0].seeder_security_group_id, null)])
  instance_type      = var.seeder_instance_type
  architecture       = var.seeder_architecture
  key_name           = var.seeder_key_name
  root_volume_size   = var.seeder_root_volume_size

  role_path                     = var.iam_role_path
  role_permissions_boundary_arn = var.iam_role_permissions_boundary_arn

  file_system_id   = one(module.efs[*].file_system_id)
  file_system_arn  = one(module.efs[*].file_system_arn)
  access_point_id  = one(module.efs[*].access_point_id)
  access_point_arn = one(module.efs[*].access_point_arn)
  mount_path       = local.mount_path

  weights_bucket_arn  = module.weights_bucket.bucket_arn
  weights_prefix      = local.weights_prefix
  weights_kms_key_arn = var.create_weights_bucket ? local.kms_key_arn : var.weights_bucket_kms_key_arn
}

module "lambda" {
  source = "./modules/lambda"

  name   = var.name
  region = var.region
  tags   = local.tags

  repository_force_delete     = var.ecr_force_delete
  repository_keep_images      = var.ecr_keep_images
  repository_keep_deployments = var.ecr_keep_deployments

  image_uri              = var.image_uri
  architecture           = var.architecture
  memory_size            = var.memory_size
  timeout                = var.timeout
  reserved_concurrency   = var.reserved_concurrency
  ephemeral_storage_size = var.ephemeral_storage_size
  model_name             = var.model_name
  local_mount_path       = local.mount_path
  environment_variables  = var.environment_variables

  # weights_source = "image": no file system, and the image's own MODEL_ROOT/MODEL_NAME stand.
  efs_enabled        = local.weights_on_efs
  vpc_enabled        = local.vpc_enabled
  subnet_ids         = try(module.network[0].private_subnet_ids, [])
  security_group_ids = compact([try(module.network[0].lambda_security_group_id, null)])
  file_system_arn    = one(module.efs[*].file_system_arn)
  access_point_arn   = one(module.efs[*].access_point_arn)

  kms_key_arn           = local.kms_key_arn
  log_retention_days    = var.log_retention_days
  application_log_level = var.application_log_level
  tracing_mode          = var.tracing_mode
  create_alarms         = var.create_alarms
  alarm_sns_topic_arn   = var.alarm_sns_topic_arn

  invoker_principals            = var.invoker_principals
  role_path                     = var.iam_role_path
  role_permissions_boundary_arn = var.iam_role_permissions_boundary_arn

  jobs_enabled                = var.jobs_enabled
  jobs_bucket_arn             = var.jobs_enabled ? module.weights_bucket.bucket_arn : null
  jobs_prefix                 = var.jobs_prefix
  jobs_kms_key_arn            = var.jobs_enabled ? local.kms_key_arn : null
  jobs_url_ttl                = var.jobs_url_ttl_seconds
  jobs_maximum_event_age      = var.jobs_maximum_event_age_seconds
  jobs_maximum_retry_attempts = var.jobs_maximum_retry_attempts
  # Outside a VPC the function reaches Lambda's public regional endpoint: no interface endpoint.
  jobs_lambda_endpoint_url = one(module.network[*].lambda_endpoint_url)
}

# weights_source made the network and the file system optional: existing stacks keep them in place.
moved {
  from = module.network
  to   = module.network[0]
}

moved {
  from = module.efs
  to   = module.efs[0]
}
