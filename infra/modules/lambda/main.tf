locals {
  create_function = var.image_uri != null
  repository_name = coalesce(var.repository_name, var.name)
  log_group_name  = "/aws/lambda/${var.name}"
  # Built from names, not read from the resources: the IAM policies below name the function and its log
  # group before either exists, and the function itself depends on those policies.
  function_arn  = "arn:${data.aws_partition.current.partition}:lambda:${data.aws_region.current.region}:${data.aws_caller_identity.current.account_id}:function:${var.name}"
  log_group_arn = "arn:${data.aws_partition.current.partition}:logs:${data.aws_region.current.region}:${data.aws_caller_identity.current.account_id}:log-group:${local.log_group_name}"

  # -1 is the provider's "no reservation" (null in the variable), which also removes an earlier one: the
  # function then shares the account's unreserved pool.
  # https://registry.terraform.io/providers/hashicorp/aws/latest/docs/resources/lambda_function#reserved_concurrent_executions-1
  reserved_concurrent_executions = var.reserved_concurrency == null ? -1 : var.reserved_concurrency

  # A flag of its own: the bucket's ARN may be known only after apply, and counts must be known at plan.
  jobs_enabled     = var.jobs_enabled
  jobs_bucket_name = local.jobs_enabled && var.jobs_bucket_arn != null ? split(":::", var.jobs_bucket_arn)[1] : null
  jobs_objects_arn = local.jobs_enabled && var.jobs_bucket_arn != null ? "${var.jobs_bucket_arn}/${var.jobs_prefix}*" : null

  # Read by sd_lambda.settings (SD_JOBS_*); without a bucket the handler answers /jobs with jobs_disabled.
  jobs_environment = local.jobs_enabled ? {
    SD_JOBS_BUCKET        = local.jobs_bucket_name
    SD_JOBS_PREFIX        = var.jobs_prefix
    SD_JOBS_URL_TTL       = tostring(var.jobs_url_ttl)
    SD_JOBS_MAX_EVENT_AGE = tostring(var.jobs_maximum_event_age)
    # Empty: the region's public endpoint. A key that is always there keeps the map's keys known at plan.
    SD_JOBS_LAMBDA_ENDPOINT = var.jobs_lambda_endpoint_url == null ? "" : var.jobs_lambda_endpoint_url
  } : {}

  # From EFS the module says where the model is; a baked image says it itself (its ENV MODEL_ROOT and
  # MODEL_NAME name the release inside it), and a value from here could only disagree with it.
  environment = merge(var.environment_variables, local.jobs_environment, var.efs_enabled ? {
    MODEL_ROOT = var.local_mount_path
    MODEL_NAME = var.model_name
  } : {})
}

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

data "aws_region" "current" {
  region = var.region
}

################################################################################
# ECR repository (created first: the image must be pushed before the function exists)
################################################################################

resource "aws_ecr_repository" "this" {
  region               = var.region
  name                 = local.repository_name
  image_tag_mutability = "IMMUTABLE"
  force_delete         = var.repository_force_delete

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = var.repository_kms_key_arn
  }

  tags = var.tags
}

resource "aws_ecr_lifecycle_policy" "this" {
  region     = var.region
  repository = aws_ecr_repository.this.name

  # ECR cannot see which digest a function runs, so `sd-lambda deploy apply` tags it
  # `deployed-<UTC time>` once the apply succeeded, and rule 1 keeps the last N of those. An image matched
  # by a higher-priority rule is never expired by a lower-priority one, so later `git-*` pushes cannot
  # expire a deployed image (a function whose digest is gone fails with StateReasonCode ImageDeleted).
  # Counts go by push time, and a retag does not change it: a rollback to an image pushed before the last
  # N deployed ones is expired by rule 1.
  # https://docs.aws.amazon.com/AmazonECR/latest/userguide/LifecyclePolicies.html
  # https://docs.aws.amazon.com/lambda/latest/api/API_FunctionConfiguration.html
  # A `tagStatus = any` rule would have to come last: untagged leftovers (interrupted pushes) get their
  # own count instead.
  # https://docs.aws.amazon.com/AmazonECR/latest/userguide/lifecycle_policy_parameters.html
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Keep the last ${var.repository_keep_deployments} deployed-* images; the function runs one of them"
        selection = {
          tagStatus      = "tagged"
          tagPatternList = ["deployed-*"]
          countType      = "imageCountMoreThan"
          countNumber    = var.repository_keep_deployments
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Keep the last ${var.repository_keep_images} git-<sha> images"
        selection = {
          tagStatus      = "tagged"
          tagPatternList = ["git-*"]
          countType      = "imageCountMoreThan"
          countNumber    = var.repository_keep_images
        }
        action = { type = "expire" }
      },
      {
        rulePriority = 3
        description  = "Keep the last ${var.repository_keep_images} untagged images"
        selection = {
          tagStatus   = "untagged"
          countType   = "imageCountMoreThan"
          countNumber = var.repository_keep_images
        }
        action = { type = "expire" }
      },
    ]
  })
}

# Lambda pulls the image with its service principal; granting it here, scoped to this function, means
# Lambda never has to rewrite the repository policy itself.
data "aws_iam_policy_document" "repository" {
  statement {
    sid     = "LambdaPullForThisFunction"
    actions = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }

    # This function and its qualified ARNs (function:name:alias) only: a bare `function:name*` would also
    # match every function whose name starts with this one's (sd-lambda-dev for sd-lambda).
    # https://docs.aws.amazon.com/lambda/latest/dg/images-create.html#configuration-images-permissions
    condition {
      test     = "StringLike"
      variable = "aws:sourceArn"
      values   = [local.function_arn, "${local.function_arn}:*"]
    }
  }
}

resource "aws_ecr_repository_policy" "this" {
  region     = var.region
  repository = aws_ecr_repository.this.name
  policy     = data.aws_iam_policy_document.repository.json
}

################################################################################
# IAM role
################################################################################

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_iam_role" "this" {
  name_prefix          = "${var.name}-"
  path                 = var.role_path
  permissions_boundary = var.role_permissions_boundary_arn
  description          = var.efs_enabled ? "sd-lambda function: mount the model access point, write its logs" : "sd-lambda function: write its logs (model in the image)"
  assume_role_policy   = data.aws_iam_policy_document.assume.json

  tags = var.tags
}

# Network interfaces in the VPC. Logging is granted inline below, on this function's log group only
# (AWSLambdaVPCAccessExecutionRole would also allow writing to every log group of the account).
resource "aws_iam_role_policy_attachment" "eni_management" {
  count = var.vpc_enabled ? 1 : 0

  role       = aws_iam_role.this.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AWSLambdaENIManagementAccess"
}

resource "aws_iam_role_policy_attachment" "xray" {
  count = var.tracing_mode == "Active" ? 1 : 0

  role       = aws_iam_role.this.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AWSXRayDaemonWriteAccess"
}

data "aws_iam_policy_document" "this" {
  # The Lambda VPC guide lists ec2:DescribeSubnets among the execution role's permissions (it is in
  # AWSLambdaVPCAccessExecutionRole since its v3); AWSLambdaENIManagementAccess lacks it. Describe
  # actions take no resource-level permissions, hence "*".
  # https://docs.aws.amazon.com/lambda/latest/dg/configuration-vpc.html#configuration-vpc-permissions
  # https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AWSLambdaENIManagementAccess.html
  dynamic "statement" {
    for_each = var.vpc_enabled ? [1] : []

    content {
      sid       = "DescribeSubnetsForVpcAttachment"
      actions   = ["ec2:DescribeSubnets"]
      resources = ["*"]
    }
  }

  statement {
    sid       = "WriteOwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${local.log_group_arn}:*"]
  }

  dynamic "statement" {
    for_each = var.efs_enabled ? [1] : []

    content {
      sid       = "ReadModelsThroughAccessPoint"
      actions   = ["elasticfilesystem:ClientMount"]
      resources = [var.file_system_arn]

      condition {
        test     = "StringEquals"
        variable = "elasticfilesystem:AccessPointArn"
        values   = [var.access_point_arn]
      }
    }
  }

  dynamic "statement" {
    for_each = var.kms_key_arn != null ? [var.kms_key_arn] : []

    content {
      sid       = "DecryptEnvironment"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      # Lambda decrypts the environment with this function's ARN as encryption context: the role can
      # decrypt nothing else with the stack's key (EFS data, weights, logs).
      condition {
        test     = "StringEquals"
        variable = "kms:EncryptionContext:aws:lambda:FunctionArn"
        values   = [local.function_arn]
      }
    }
  }
}

resource "aws_iam_role_policy" "this" {
  name   = "read-models"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.this.json
}

# Jobs (sd_lambda.serving.jobs): the function stores requests, statuses and images under its prefix of
# the bucket, signs GET URLs for them (a presigned URL carries the signer's permissions, so reading is
# granted on the prefix only) and starts its own asynchronous invocation.
# https://docs.aws.amazon.com/AmazonS3/latest/userguide/using-presigned-url.html
data "aws_iam_policy_document" "jobs" {
  count = local.jobs_enabled ? 1 : 0

  statement {
    sid       = "WriteJobObjects"
    actions   = ["s3:PutObject"]
    resources = [local.jobs_objects_arn]
  }

  statement {
    sid       = "ReadJobObjects"
    actions   = ["s3:GetObject"]
    resources = [local.jobs_objects_arn]
  }

  # Lets S3 answer 404 instead of 403 for a job id that does not exist, and nothing outside the prefix.
  # https://docs.aws.amazon.com/AmazonS3/latest/API/API_GetObject.html
  statement {
    sid       = "ListJobObjects"
    actions   = ["s3:ListBucket"]
    resources = [var.jobs_bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.jobs_prefix}*"]
    }
  }

  # SSE-KMS: writing needs a data key, reading (and a presigned GET) needs Decrypt. S3 asks KMS with the
  # object's ARN as encryption context, or the bucket's with an S3 Bucket Key: either, nothing else.
  # https://docs.aws.amazon.com/AmazonS3/latest/userguide/UsingKMSEncryption.html#aws-managed-customer-managed-keys
  # https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucket-key.html#bucket-key-changes
  dynamic "statement" {
    for_each = var.jobs_kms_key_arn != null ? [var.jobs_kms_key_arn] : []

    content {
      sid       = "EncryptJobObjects"
      actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringLike"
        variable = "kms:EncryptionContext:aws:s3:arn"
        values   = [var.jobs_bucket_arn, local.jobs_objects_arn]
      }

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["s3.${data.aws_region.current.region}.amazonaws.com"]
      }
    }
  }

  # Itself, unqualified, by the ARN built from its name: no dependency on the function resource.
  statement {
    sid       = "StartOwnJobs"
    actions   = ["lambda:InvokeFunction"]
    resources = [local.function_arn]
  }
}

resource "aws_iam_role_policy" "jobs" {
  count = local.jobs_enabled ? 1 : 0

  name   = "run-jobs"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.jobs[0].json

  lifecycle {
    precondition {
      condition     = var.jobs_bucket_arn != null
      error_message = "jobs_enabled = true needs jobs_bucket_arn: the bucket of the jobs' requests and results."
    }
  }
}

################################################################################
# Function
################################################################################

# Created before the function so Lambda never creates it without retention or encryption.
resource "aws_cloudwatch_log_group" "this" {
  region            = var.region
  name              = local.log_group_name
  retention_in_days = var.log_retention_days
  kms_key_id        = var.kms_key_arn

  tags = var.tags
}

resource "aws_lambda_function" "this" {
  #checkov:skip=CKV_AWS_116:The only asynchronous invocations are jobs, and the handler records every job's outcome (or GET /jobs reports it lost after its deadline); a dead-letter queue would hold just the job's reference.
  #checkov:skip=CKV_AWS_272:Lambda code signing applies to .zip packages only; this function is a container image pinned by digest.
  #checkov:skip=CKV_AWS_117:Outside a VPC only with vpc_enabled = false, which EFS refuses: a function whose model is in its image reaches nothing private, only S3 and the Lambda API through their IAM-authorised public endpoints.
  count = local.create_function ? 1 : 0

  region                         = var.region
  function_name                  = var.name
  description                    = var.efs_enabled ? "Text-to-image with diffusers; model ${var.model_name} from EFS" : "Text-to-image with diffusers; model baked into the image"
  role                           = aws_iam_role.this.arn
  package_type                   = "Image"
  image_uri                      = var.image_uri
  architectures                  = [var.architecture]
  memory_size                    = var.memory_size
  timeout                        = var.timeout
  reserved_concurrent_executions = local.reserved_concurrent_executions
  kms_key_arn                    = var.kms_key_arn

  # Lambda keeps a destroyed function's ENIs for a while; moving them to the default security group
  # lets `terraform destroy` delete the stack's groups without waiting for that.
  replace_security_groups_on_destroy = var.vpc_enabled ? true : null

  ephemeral_storage {
    size = var.ephemeral_storage_size
  }

  environment {
    variables = local.environment
  }

  # Lambda mounts EFS only from a VPC; without one the function reaches S3 and the Lambda API at their
  # public regional endpoints.
  # https://docs.aws.amazon.com/lambda/latest/dg/configuration-filesystem.html
  # https://docs.aws.amazon.com/lambda/latest/dg/configuration-vpc.html
  dynamic "vpc_config" {
    for_each = var.vpc_enabled ? [1] : []

    content {
      subnet_ids         = var.subnet_ids
      security_group_ids = var.security_group_ids
    }
  }

  dynamic "file_system_config" {
    for_each = var.efs_enabled ? [1] : []

    content {
      arn              = var.access_point_arn
      local_mount_path = var.local_mount_path
    }
  }

  logging_config {
    log_format            = "JSON"
    log_group             = aws_cloudwatch_log_group.this.name
    application_log_level = var.application_log_level
    system_log_level      = "INFO"
  }

  tracing_config {
    mode = var.tracing_mode
  }

  tags = var.tags

  lifecycle {
    precondition {
      condition     = var.vpc_enabled || !var.efs_enabled
      error_message = "efs_enabled = true needs vpc_enabled = true: Lambda mounts EFS only from subnets of a VPC."
    }
  }

  depends_on = [
    aws_cloudwatch_log_group.this,
    aws_iam_role_policy.this,
    aws_iam_role_policy.jobs,
    aws_iam_role_policy_attachment.eni_management,
    aws_ecr_repository_policy.this,
  ]
}

# The handler never raises for a job (every outcome is written to its status), so a retry would only
# follow a timeout or running out of memory, which the same request would most likely repeat at full
# cost: none. Events waiting longer than the maximum age (throttling) are dropped, and GET /jobs/{id}
# then reports the job expired (SD_JOBS_MAX_EVENT_AGE is the same number).
# https://docs.aws.amazon.com/lambda/latest/dg/invocation-async-error-handling.html
resource "aws_lambda_function_event_invoke_config" "this" {
  count = local.create_function && local.jobs_enabled ? 1 : 0

  region                       = var.region
  function_name                = aws_lambda_function.this[0].function_name
  maximum_retry_attempts       = var.jobs_maximum_retry_attempts
  maximum_event_age_in_seconds = var.jobs_maximum_event_age
}

resource "aws_lambda_function_url" "this" {
  count = local.create_function ? 1 : 0

  region             = var.region
  function_name      = aws_lambda_function.this[0].function_name
  authorization_type = "AWS_IAM" # never NONE: every request must be SigV4-signed by a permitted principal
}

# Since October 2025 a new function URL needs both lambda:InvokeFunctionUrl and lambda:InvokeFunction.
# https://docs.aws.amazon.com/lambda/latest/dg/urls-auth.html
#
# The URL statement's condition key is documented for identity policies. lambda:InvokedViaFunctionUrl is
# documented as AddPermission's InvokedViaFunctionUrl (a function's resource-based policy); no AWS page
# shows Lambda supplying it when it evaluates an identity policy, so the identity policy's conditional
# InvokeFunction statement may never match. The documented grant is the function permission below, one
# pair per invoker principal: InvokeFunctionUrl (AuthType AWS_IAM) and InvokeFunction through the URL.
data "aws_iam_policy_document" "invoker" {
  statement {
    sid       = "InvokeFunctionUrl"
    actions   = ["lambda:InvokeFunctionUrl"]
    resources = [local.function_arn]

    condition {
      test     = "StringEquals"
      variable = "lambda:FunctionUrlAuthType"
      values   = ["AWS_IAM"]
    }
  }

  # Only as part of a function URL request where AWS evaluates the key: holders cannot call the Invoke
  # API directly and so bypass what the URL path enforces (AWS_IAM auth type, the request size limits).
  statement {
    sid       = "InvokeFunctionThroughUrl"
    actions   = ["lambda:InvokeFunction"]
    resources = [local.function_arn]

    condition {
      test     = "Bool"
      variable = "lambda:InvokedViaFunctionUrl"
      values   = ["true"]
    }
  }
}

resource "aws_lambda_permission" "invoke_function_url" {
  for_each = local.create_function ? toset(var.invoker_principals) : toset([])

  region                 = var.region
  statement_id_prefix    = "InvokeFunctionUrl-"
  function_name          = aws_lambda_function.this[0].function_name
  action                 = "lambda:InvokeFunctionUrl"
  principal              = each.value
  function_url_auth_type = "AWS_IAM"
}

resource "aws_lambda_permission" "invoke_function_through_url" {
  for_each = local.create_function ? toset(var.invoker_principals) : toset([])

  region                   = var.region
  statement_id_prefix      = "InvokeFunctionThroughUrl-"
  function_name            = aws_lambda_function.this[0].function_name
  action                   = "lambda:InvokeFunction"
  principal                = each.value
  invoked_via_function_url = true
}

################################################################################
# Alarms (optional)
################################################################################

locals {
  alarms = var.create_alarms && local.create_function ? {
    errors = {
      metric    = "Errors"
      statistic = "Sum"
      threshold = 0
      text      = "The function returned errors"
    }
    throttles = {
      metric    = "Throttles"
      statistic = "Sum"
      threshold = 0
      text      = var.reserved_concurrency == null ? "Requests were throttled by the account's concurrency limit" : "Requests were throttled by the reserved concurrency"
    }
    duration = {
      metric    = "Duration"
      statistic = "Maximum"
      threshold = floor(var.timeout * 1000 * var.duration_alarm_ratio)
      text      = "An invocation ran for more than ${var.duration_alarm_ratio * 100}% of the timeout"
    }
  } : {}
}

resource "aws_cloudwatch_metric_alarm" "this" {
  for_each = local.alarms

  region              = var.region
  alarm_name          = "${var.name}-${each.key}"
  alarm_description   = each.value.text
  namespace           = "AWS/Lambda"
  metric_name         = each.value.metric
  statistic           = each.value.statistic
  dimensions          = { FunctionName = aws_lambda_function.this[0].function_name }
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = each.value.threshold
  treat_missing_data  = "notBreaching"
  alarm_actions       = [var.alarm_sns_topic_arn]
  ok_actions          = [var.alarm_sns_topic_arn]

  tags = var.tags

  lifecycle {
    precondition {
      condition     = var.alarm_sns_topic_arn != null
      error_message = "create_alarms = true needs alarm_sns_topic_arn."
    }
  }
}

# vpc_enabled made the VPC permission optional: existing functions keep the attachment in place.
moved {
  from = aws_iam_role_policy_attachment.eni_management
  to   = aws_iam_role_policy_attachment.eni_management[0]
}
