data "aws_region" "current" {
  region = var.region
}

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

data "aws_availability_zones" "available" {
  count = var.create_vpc && length(var.availability_zones) == 0 ? 1 : 0

  region = var.region
  state  = "available"

  # Only the region's regular zones (us-east-1a...): Local and Wavelength Zones (us-east-1-bos-1a) sort
  # before them and would otherwise be picked for the subnets in accounts that opted into them.
  filter {
    name   = "zone-name"
    values = ["${data.aws_region.current.region}?"]
  }
}

# The S3 prefix list lets the seeder's egress rule name S3 instead of opening 443 to the world.
data "aws_ec2_managed_prefix_list" "s3" {
  region = var.region
  name   = "com.amazonaws.${data.aws_region.current.region}.s3"
}

# An existing VPC is read to check what the stack relies on before anything is created.
data "aws_vpc" "existing" {
  count = var.create_vpc ? 0 : 1

  region = var.region
  id     = var.vpc_id

  lifecycle {
    # efs-utils mounts the file system by its DNS name, and interface endpoints with private DNS only
    # answer through the VPC resolver: both need DNS resolution and DNS hostnames.
    # https://docs.aws.amazon.com/efs/latest/ug/mounting-fs-mount-cmd-dns-name.html
    # https://docs.aws.amazon.com/vpc/latest/privatelink/manage-dns-names.html
    postcondition {
      condition     = self.enable_dns_support
      error_message = "VPC ${var.vpc_id} has DNS resolution (enableDnsSupport) turned off: EFS mounts by DNS name and the SSM endpoints' private DNS need it. Turn it on in the VPC's settings (ModifyVpcAttribute EnableDnsSupport)."
    }

    postcondition {
      condition     = self.enable_dns_hostnames
      error_message = "VPC ${var.vpc_id} has DNS hostnames (enableDnsHostnames) turned off: EFS mounts by DNS name and the SSM endpoints' private DNS need it. Turn it on in the VPC's settings (ModifyVpcAttribute EnableDnsHostnames)."
    }
  }
}

data "aws_subnet" "existing" {
  for_each = var.create_vpc ? toset([]) : toset(var.private_subnet_ids)

  region = var.region
  id     = each.value
}

locals {
  # EFS allows one mount target per availability zone: two subnets in one zone fail at apply, after the
  # file system exists. https://docs.aws.amazon.com/efs/latest/ug/accessing-fs.html
  existing_subnet_zones = { for id, subnet in data.aws_subnet.existing : id => subnet.availability_zone }

  azs = var.create_vpc ? (
    length(var.availability_zones) > 0 ? var.availability_zones : slice(data.aws_availability_zones.available[0].names, 0, var.az_count)
  ) : []

  vpc_id             = var.create_vpc ? aws_vpc.this[0].id : var.vpc_id
  private_subnet_ids = var.create_vpc ? aws_subnet.private[*].id : var.private_subnet_ids
  route_table_ids    = var.create_vpc ? aws_route_table.private[*].id : var.private_route_table_ids

  # A new VPC's endpoint is its only way to S3. In an existing VPC it changes the caller's routing, so it
  # is created only on request (create_s3_endpoint).
  create_s3_endpoint   = var.create_vpc || var.create_s3_endpoint
  restrict_s3_endpoint = var.create_vpc && var.s3_endpoint_policy == null && length(var.s3_endpoint_bucket_arns) > 0
  s3_endpoint_policy   = local.restrict_s3_endpoint ? data.aws_iam_policy_document.s3_endpoint[0].json : var.s3_endpoint_policy
  ssm_services         = var.create_ssm_endpoints ? toset(["ssm", "ssmmessages", "ec2messages"]) : toset([])
}

################################################################################
# VPC (optional): private subnets only, no internet or NAT gateway
################################################################################

resource "aws_vpc" "this" {
  count = var.create_vpc ? 1 : 0

  region               = var.region
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true # efs-utils and the interface endpoints resolve through VPC DNS

  tags = merge(var.tags, { Name = var.name })
}

# Adopt the default security group and leave it with no rules, so nothing uses it by accident.
resource "aws_default_security_group" "this" {
  count = var.create_vpc ? 1 : 0

  region = var.region
  vpc_id = aws_vpc.this[0].id

  tags = merge(var.tags, { Name = "${var.name}-default-deny" })
}

resource "aws_subnet" "private" {
  count = var.create_vpc ? length(local.azs) : 0

  region                  = var.region
  vpc_id                  = aws_vpc.this[0].id
  cidr_block              = cidrsubnet(var.vpc_cidr, 4, count.index)
  availability_zone       = local.azs[count.index]
  map_public_ip_on_launch = false

  tags = merge(var.tags, { Name = "${var.name}-private-${local.azs[count.index]}" })
}

resource "aws_route_table" "private" {
  count = var.create_vpc ? 1 : 0

  region = var.region
  vpc_id = aws_vpc.this[0].id

  tags = merge(var.tags, { Name = "${var.name}-private" })
}

resource "aws_route_table_association" "private" {
  count = var.create_vpc ? length(local.azs) : 0

  region         = var.region
  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[0].id
}

################################################################################
# VPC flow logs (new VPC only)
################################################################################

resource "aws_cloudwatch_log_group" "flow_logs" {
  count = var.create_vpc && var.enable_flow_logs ? 1 : 0

  region            = var.region
  name              = "/aws/vpc-flow-logs/${var.name}"
  retention_in_days = var.flow_log_retention_days
  kms_key_id        = var.kms_key_arn

  tags = var.tags
}

data "aws_iam_policy_document" "flow_logs_assume" {
  count = var.create_vpc && var.enable_flow_logs ? 1 : 0

  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["vpc-flow-logs.amazonaws.com"]
    }

    # Only flow logs of this account, in this region, may use the role (confused-deputy guard).
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }

    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = ["arn:${data.aws_partition.current.partition}:ec2:${data.aws_region.current.region}:${data.aws_caller_identity.current.account_id}:vpc-flow-log/*"]
    }
  }
}

resource "aws_iam_role" "flow_logs" {
  count = var.create_vpc && var.enable_flow_logs ? 1 : 0

  name_prefix          = "${var.name}-flow-logs-"
  path                 = var.role_path
  permissions_boundary = var.role_permissions_boundary_arn
  assume_role_policy   = data.aws_iam_policy_document.flow_logs_assume[0].json

  tags = var.tags
}

data "aws_iam_policy_document" "flow_logs" {
  count = var.create_vpc && var.enable_flow_logs ? 1 : 0

  statement {
    # DescribeLogGroups is left out: it only works on log-group:* and the role never needs it here.
    actions = [
      "logs:CreateLogStream",
      "logs:PutLogEvents",
      "logs:DescribeLogStreams",
    ]
    resources = ["${aws_cloudwatch_log_group.flow_logs[0].arn}:*"]
  }
}

resource "aws_iam_role_policy" "flow_logs" {
  count = var.create_vpc && var.enable_flow_logs ? 1 : 0

  name   = "write-flow-logs"
  role   = aws_iam_role.flow_logs[0].id
  policy = data.aws_iam_policy_document.flow_logs[0].json
}

resource "aws_flow_log" "this" {
  count = var.create_vpc && var.enable_flow_logs ? 1 : 0

  region               = var.region
  vpc_id               = aws_vpc.this[0].id
  traffic_type         = "ALL"
  log_destination_type = "cloud-watch-logs"
  log_destination      = aws_cloudwatch_log_group.flow_logs[0].arn
  iam_role_arn         = aws_iam_role.flow_logs[0].arn

  tags = merge(var.tags, { Name = var.name })
}

################################################################################
# Security groups
################################################################################

resource "aws_security_group" "lambda" {
  #checkov:skip=CKV2_AWS_5:Attached to the function's network interfaces by the lambda module (vpc_config), which receives it through the lambda_security_group_id output.
  region      = var.region
  name_prefix = "${var.name}-lambda-"
  # One description in every mode, as first created: a changed description replaces the group, and the old
  # one goes only once Lambda releases its network interfaces (slow), so a mode switch would stall on it.
  # The rules below say what the group allows (NFS to EFS; 443 for jobs).
  description = "sd-lambda function ENIs: NFS to EFS only"
  vpc_id      = local.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-lambda" })

  lifecycle {
    create_before_destroy = true

    precondition {
      condition     = var.create_vpc || (var.vpc_id != null && length(var.private_subnet_ids) >= 2)
      error_message = "With create_vpc = false, set vpc_id and at least two private_subnet_ids in distinct availability zones."
    }

    precondition {
      condition     = length(distinct(values(local.existing_subnet_zones))) == length(local.existing_subnet_zones)
      error_message = "private_subnet_ids must each be in a different availability zone (EFS allows one mount target per zone); their zones are ${jsonencode(local.existing_subnet_zones)}."
    }

    precondition {
      condition     = var.create_vpc || !var.create_s3_endpoint || length(var.private_route_table_ids) > 0
      error_message = "create_s3_endpoint = true needs private_route_table_ids: the route tables that get the endpoint's S3 route."
    }

    precondition {
      condition     = var.create_vpc || var.create_s3_endpoint || length(var.private_route_table_ids) == 0
      error_message = "private_route_table_ids are only used with create_s3_endpoint = true, which adds an S3 route to them (every S3 request from their subnets then goes through the endpoint): set create_s3_endpoint = true to do that, or drop private_route_table_ids."
    }
  }
}

resource "aws_security_group" "efs" {
  #checkov:skip=CKV2_AWS_5:Attached to the EFS mount targets by the efs module, which receives it through the efs_security_group_id output.
  count = var.efs_enabled ? 1 : 0

  region      = var.region
  name_prefix = "${var.name}-efs-"
  description = "EFS mount targets: NFS from the function and the seeder only"
  vpc_id      = local.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-efs" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "seeder" {
  #checkov:skip=CKV2_AWS_5:Attached to the seeder instance by the seeder module, which receives it through the seeder_security_group_id output.
  count = var.efs_enabled ? 1 : 0

  region      = var.region
  name_prefix = "${var.name}-seeder-"
  description = "Seeder instance: HTTPS to S3 and the SSM endpoints, NFS to EFS"
  vpc_id      = local.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-seeder" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "lambda_endpoint" {
  count = var.create_lambda_endpoint ? 1 : 0

  region      = var.region
  name_prefix = "${var.name}-lambda-endpoint-"
  description = "Lambda API interface endpoint: HTTPS from the function only (it starts its own jobs)"
  vpc_id      = local.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-lambda-endpoint" })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "endpoints" {
  count = var.create_ssm_endpoints ? 1 : 0

  region      = var.region
  name_prefix = "${var.name}-endpoints-"
  description = "SSM interface endpoints: HTTPS from the seeder only"
  vpc_id      = local.vpc_id

  tags = merge(var.tags, { Name = "${var.name}-endpoints" })

  lifecycle {
    create_before_destroy = true
  }
}

# Every rule is its own resource (no inline rules), one resource per direction. A rule names exactly one
# peer: another group of this stack, the S3 prefix list, or an operator-supplied CIDR. Rules with
# `enabled = false` belong to resources this configuration does not create.
locals {
  ingress_rules = {
    efs_from_lambda = {
      enabled                      = var.efs_enabled
      security_group_id            = one(aws_security_group.efs[*].id)
      description                  = "NFS from the Lambda function"
      port                         = 2049
      referenced_security_group_id = aws_security_group.lambda.id
    }
    efs_from_seeder = {
      enabled                      = var.efs_enabled
      security_group_id            = one(aws_security_group.efs[*].id)
      description                  = "NFS from the seeder"
      port                         = 2049
      referenced_security_group_id = one(aws_security_group.seeder[*].id)
    }
    lambda_endpoint_from_lambda = {
      enabled                      = var.create_lambda_endpoint
      security_group_id            = one(aws_security_group.lambda_endpoint[*].id)
      description                  = "HTTPS from the function (lambda:InvokeFunction for its jobs)"
      port                         = 443
      referenced_security_group_id = aws_security_group.lambda.id
    }
    endpoints_from_seeder = {
      enabled                      = var.create_ssm_endpoints && var.efs_enabled
      security_group_id            = one(aws_security_group.endpoints[*].id)
      description                  = "HTTPS from the seeder's SSM agent"
      port                         = 443
      referenced_security_group_id = one(aws_security_group.seeder[*].id)
    }
  }

  egress_rules = {
    lambda_to_efs = {
      enabled                      = var.efs_enabled
      security_group_id            = aws_security_group.lambda.id
      description                  = "NFS to the EFS mount targets"
      port                         = 2049
      referenced_security_group_id = one(aws_security_group.efs[*].id)
    }
    lambda_to_s3 = {
      enabled           = var.lambda_s3_egress
      security_group_id = aws_security_group.lambda.id
      description       = "HTTPS to S3 (the jobs prefix of the weights bucket) through the gateway endpoint"
      port              = 443
      prefix_list_id    = data.aws_ec2_managed_prefix_list.s3.id
    }
    lambda_to_lambda_endpoint = {
      enabled                      = var.create_lambda_endpoint
      security_group_id            = aws_security_group.lambda.id
      description                  = "HTTPS to the Lambda API interface endpoint"
      port                         = 443
      referenced_security_group_id = one(aws_security_group.lambda_endpoint[*].id)
    }
    seeder_to_efs = {
      enabled                      = var.efs_enabled
      security_group_id            = one(aws_security_group.seeder[*].id)
      description                  = "NFS to the EFS mount targets"
      port                         = 2049
      referenced_security_group_id = one(aws_security_group.efs[*].id)
    }
    seeder_to_s3 = {
      enabled           = var.efs_enabled
      security_group_id = one(aws_security_group.seeder[*].id)
      description       = "HTTPS to S3 (weights bucket, Amazon Linux repositories) through the gateway endpoint"
      port              = 443
      prefix_list_id    = data.aws_ec2_managed_prefix_list.s3.id
    }
    seeder_to_endpoints = {
      enabled                      = var.create_ssm_endpoints && var.efs_enabled
      security_group_id            = one(aws_security_group.seeder[*].id)
      description                  = "HTTPS to the SSM interface endpoints"
      port                         = 443
      referenced_security_group_id = one(aws_security_group.endpoints[*].id)
    }
  }

  # Operator-supplied CIDRs, keyed by the CIDR so adding one never touches the others.
  ssh_ingress_rules = {
    for cidr in var.efs_enabled ? var.ssh_ingress_cidrs : [] : "seeder_ssh ${cidr}" => {
      security_group_id = one(aws_security_group.seeder[*].id)
      description       = "SSH from ${cidr} (operator-supplied)"
      port              = 22
      cidr              = cidr
    }
  }

  https_egress_rules = {
    for cidr in var.efs_enabled ? var.seeder_https_egress_cidrs : [] : "seeder_https ${cidr}" => {
      security_group_id = one(aws_security_group.seeder[*].id)
      description       = "HTTPS to ${cidr} (operator-supplied)"
      port              = 443
      cidr              = cidr
    }
  }
}

resource "aws_vpc_security_group_ingress_rule" "this" {
  for_each = merge({ for key, rule in local.ingress_rules : key => rule if try(rule.enabled, true) }, local.ssh_ingress_rules)

  region                       = var.region
  security_group_id            = each.value.security_group_id
  description                  = each.value.description
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
  referenced_security_group_id = try(each.value.referenced_security_group_id, null)
  prefix_list_id               = try(each.value.prefix_list_id, null)
  cidr_ipv4                    = try(strcontains(each.value.cidr, ":") ? null : each.value.cidr, null)
  cidr_ipv6                    = try(strcontains(each.value.cidr, ":") ? each.value.cidr : null, null)

  tags = var.tags
}

resource "aws_vpc_security_group_egress_rule" "this" {
  for_each = merge({ for key, rule in local.egress_rules : key => rule if try(rule.enabled, true) }, local.https_egress_rules)

  region                       = var.region
  security_group_id            = each.value.security_group_id
  description                  = each.value.description
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
  referenced_security_group_id = try(each.value.referenced_security_group_id, null)
  prefix_list_id               = try(each.value.prefix_list_id, null)
  cidr_ipv4                    = try(strcontains(each.value.cidr, ":") ? null : each.value.cidr, null)
  cidr_ipv6                    = try(strcontains(each.value.cidr, ":") ? each.value.cidr : null, null)

  tags = var.tags
}

################################################################################
# VPC endpoints
################################################################################

resource "aws_vpc_endpoint" "s3" {
  count = local.create_s3_endpoint ? 1 : 0

  region            = var.region
  vpc_id            = local.vpc_id
  service_name      = "com.amazonaws.${data.aws_region.current.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = local.route_table_ids
  policy            = local.s3_endpoint_policy

  tags = merge(var.tags, { Name = "${var.name}-s3" })
}

# In a VPC of its own the gateway endpoint is the only way to S3, so it may reach only what the stack
# reads: the weights bucket (weights and the seeding program) and the AWS buckets that dnf (Amazon Linux
# 2023 repositories) and the SSM agent download from. An existing VPC's route tables serve other
# workloads too: there the endpoint takes s3_endpoint_policy, or AWS's default full-access policy.
data "aws_iam_policy_document" "s3_endpoint" {
  count = local.restrict_s3_endpoint ? 1 : 0

  statement {
    sid       = "ReadStackBuckets"
    actions   = ["s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"]
    resources = flatten([for arn in var.s3_endpoint_bucket_arns : [arn, "${arn}/*"]])

    principals {
      type        = "*"
      identifiers = ["*"]
    }
  }

  # The function's jobs: it writes requests, statuses and images under its prefix (its role allows no more).
  dynamic "statement" {
    for_each = length(var.s3_endpoint_write_object_arns) > 0 ? [var.s3_endpoint_write_object_arns] : []

    content {
      sid       = "WriteJobObjects"
      actions   = ["s3:PutObject"]
      resources = statement.value

      principals {
        type        = "*"
        identifiers = ["*"]
      }
    }
  }

  statement {
    sid     = "AmazonLinuxAndSsmAgentDownloads"
    actions = ["s3:GetObject"]
    resources = [
      for bucket in [
        "al2023-repos-${data.aws_region.current.region}-de612dc2",
        "amazon-ssm-${data.aws_region.current.region}",
        "amazon-ssm-packages-${data.aws_region.current.region}",
        "aws-ssm-${data.aws_region.current.region}",
        "aws-ssm-document-attachments-${data.aws_region.current.region}",
        "${data.aws_region.current.region}-birdwatcher-prod",
      ] : "arn:${data.aws_partition.current.partition}:s3:::${bucket}/*"
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
  }
}

# Interface endpoints cost per hour and per zone, and only the seeder uses them: one subnet is enough.
resource "aws_vpc_endpoint" "ssm" {
  for_each = local.ssm_services

  region              = var.region
  vpc_id              = local.vpc_id
  service_name        = "com.amazonaws.${data.aws_region.current.region}.${each.value}"
  vpc_endpoint_type   = "Interface"
  private_dns_enabled = true
  subnet_ids          = [local.private_subnet_ids[0]]
  security_group_ids  = [aws_security_group.endpoints[0].id]

  tags = merge(var.tags, { Name = "${var.name}-${each.value}" })
}

# The function has no NAT: to start a job's asynchronous invocation it calls the Lambda API through this
# interface endpoint. https://docs.aws.amazon.com/lambda/latest/dg/configuration-vpc-endpoints.html
# Private DNS stays off: the function calls the endpoint by its own DNS name (the lambda module's
# SD_JOBS_LAMBDA_ENDPOINT), so lambda.<region>.amazonaws.com keeps resolving as before for every other
# workload of the VPC. One subnet, as for the SSM endpoints: it is reachable from every zone of the VPC,
# and each zone added costs as much again.
resource "aws_vpc_endpoint" "lambda" {
  count = var.create_lambda_endpoint ? 1 : 0

  region              = var.region
  vpc_id              = local.vpc_id
  service_name        = "com.amazonaws.${data.aws_region.current.region}.lambda"
  vpc_endpoint_type   = "Interface"
  private_dns_enabled = false
  subnet_ids          = [local.private_subnet_ids[0]]
  security_group_ids  = [aws_security_group.lambda_endpoint[0].id]
  policy              = data.aws_iam_policy_document.lambda_endpoint[0].json

  tags = merge(var.tags, { Name = "${var.name}-lambda" })
}

# Only invocations of the functions named here pass the endpoint, whoever signs them.
# https://docs.aws.amazon.com/lambda/latest/dg/configuration-vpc-endpoints.html#vpc-endpoint-policy
data "aws_iam_policy_document" "lambda_endpoint" {
  count = var.create_lambda_endpoint ? 1 : 0

  statement {
    sid       = "InvokeTheStacksFunction"
    actions   = ["lambda:InvokeFunction"]
    resources = var.lambda_endpoint_function_arns

    principals {
      type        = "*"
      identifiers = ["*"]
    }
  }
}
