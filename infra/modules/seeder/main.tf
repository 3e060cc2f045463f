locals {
  ami_ssm_parameter = coalesce(
    var.ami_ssm_parameter,
    "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-${var.architecture}",
  )

  # Graviton families carry a "g" after the generation number (t4g, m7gd, c7gn, hpc7g); a1 is the first.
  instance_architecture = can(regex("^(a1|[a-z]+[0-9]+g[a-z0-9-]*)\\.", var.instance_type)) ? "arm64" : "x86_64"
}

data "aws_partition" "current" {}

data "aws_caller_identity" "current" {}

data "aws_region" "current" {
  region = var.region
}

data "aws_ssm_parameter" "ami" {
  count = var.create ? 1 : 0

  region = var.region
  name   = local.ami_ssm_parameter
}

################################################################################
# IAM: SSM agent, read-only weights prefix, EFS client write through the access point
################################################################################

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "this" {
  count = var.create ? 1 : 0

  name_prefix          = "${var.name}-seeder-"
  path                 = var.role_path
  permissions_boundary = var.role_permissions_boundary_arn
  description          = "sd-lambda seeder: copies model weights from S3 to EFS, driven through SSM"
  assume_role_policy   = data.aws_iam_policy_document.assume.json

  tags = var.tags
}

data "aws_iam_policy_document" "this" {
  # The SSM agent's own calls, instead of AmazonSSMManagedInstanceCore, whose ssm:GetParameter(s) on "*"
  # would let the instance read every parameter of the account. Registering (UpdateInstanceInformation)
  # plus the ec2messages channel is what Run Command needs; ssmmessages carries Session Manager.
  # Associations, inventory, patching and Distributor are not used here.
  # https://docs.aws.amazon.com/systems-manager/latest/userguide/setup-instance-permissions.html
  # https://docs.aws.amazon.com/aws-managed-policy/latest/reference/AmazonSSMManagedInstanceCore.html
  statement {
    sid       = "SsmAgentRegistersThisInstance"
    actions   = ["ssm:UpdateInstanceInformation"]
    resources = ["arn:${data.aws_partition.current.partition}:ec2:${data.aws_region.current.region}:${data.aws_caller_identity.current.account_id}:instance/*"]
  }

  # ec2messages and ssmmessages actions take no resource-level permissions.
  statement {
    sid = "SsmAgentMessageChannels"
    actions = [
      "ec2messages:AcknowledgeMessage",
      "ec2messages:DeleteMessage",
      "ec2messages:FailMessage",
      "ec2messages:GetEndpoint",
      "ec2messages:GetMessages",
      "ec2messages:SendReply",
      "ssmmessages:CreateControlChannel",
      "ssmmessages:CreateDataChannel",
      "ssmmessages:OpenControlChannel",
      "ssmmessages:OpenDataChannel",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "ListWeightsPrefix"
    actions   = ["s3:ListBucket"]
    resources = [var.weights_bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = [var.weights_prefix, "${var.weights_prefix}*"]
    }
  }

  statement {
    sid       = "ReadWeights"
    actions   = ["s3:GetObject", "s3:GetObjectVersion"]
    resources = ["${var.weights_bucket_arn}/${var.weights_prefix}*"]
  }

  statement {
    sid       = "WriteEfsThroughAccessPoint"
    actions   = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"]
    resources = [var.file_system_arn]

    condition {
      test     = "StringEquals"
      variable = "elasticfilesystem:AccessPointArn"
      values   = [var.access_point_arn]
    }
  }

  dynamic "statement" {
    for_each = var.weights_kms_key_arn != null ? [var.weights_kms_key_arn] : []

    content {
      sid       = "DecryptWeights"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      # The context is the bucket's ARN with an S3 bucket key, the object's ARN without one.
      condition {
        test     = "StringLike"
        variable = "kms:EncryptionContext:aws:s3:arn"
        values   = [var.weights_bucket_arn, "${var.weights_bucket_arn}/${var.weights_prefix}*"]
      }
    }
  }
}

resource "aws_iam_role_policy" "this" {
  count = var.create ? 1 : 0

  name   = "seed-weights"
  role   = aws_iam_role.this[0].id
  policy = data.aws_iam_policy_document.this.json
}

resource "aws_iam_instance_profile" "this" {
  count = var.create ? 1 : 0

  name_prefix = "${var.name}-seeder-"
  path        = var.role_path
  role        = aws_iam_role.this[0].name

  tags = var.tags
}

################################################################################
# Instance
################################################################################

# Terraform creates the instance but never manages whether it runs: the seeding driver starts it for a
# run and stops it afterwards (EC2 API), and aws_instance does not act on its observed running/stopped
# state, so plans stay empty either way. There is deliberately no aws_ec2_instance_state resource.
resource "aws_instance" "this" {
  #checkov:skip=CKV_AWS_126:The instance runs only during seeding and is stopped otherwise; 1-minute metrics would add cost for an instance that is idle or off.
  count = var.create ? 1 : 0

  region                      = var.region
  ami                         = data.aws_ssm_parameter.ami[0].insecure_value
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id
  vpc_security_group_ids      = var.security_group_ids
  iam_instance_profile        = aws_iam_instance_profile.this[0].name
  key_name                    = var.key_name
  associate_public_ip_address = false
  ebs_optimized               = true
  monitoring                  = false

  user_data = templatefile("${path.module}/user_data.sh.tftpl", {
    file_system_id  = var.file_system_id
    access_point_id = var.access_point_id
    mount_path      = var.mount_path
  })
  user_data_replace_on_change = true
  # The user data ends the first boot with `shutdown`: that must stop the instance, never terminate it.
  # "stop" is EC2's default for EBS-backed instances, pinned here so it cannot drift
  # (https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/Using_ChangingInstanceInitiatedShutdownBehavior.html).
  instance_initiated_shutdown_behavior = "stop"

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  root_block_device {
    encrypted             = true
    kms_key_id            = var.root_volume_kms_key_arn
    volume_type           = "gp3"
    volume_size           = var.root_volume_size
    delete_on_termination = true
    tags                  = merge(var.tags, { Name = "${var.name}-seeder" })
  }

  tags = merge(var.tags, { Name = "${var.name}-seeder" })

  lifecycle {
    # A new AL2023 release must not replace a seeded, stopped instance; replace it on purpose with
    # `terraform apply -replace=...` when you want the new AMI.
    ignore_changes = [ami]

    precondition {
      condition     = local.instance_architecture == var.architecture
      error_message = "The seeder's instance_type ${var.instance_type} runs ${local.instance_architecture} but its AMI architecture is ${var.architecture}: set them to match (e.g. t3.small with x86_64, t4g.small with arm64)."
    }
  }
}
