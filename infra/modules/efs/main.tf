resource "aws_efs_file_system" "this" {
  #checkov:skip=CKV2_AWS_18:The file system is a cache of the weights bucket, re-seeded from S3 at any time; AWS Backup would only add cost.
  region           = var.region
  creation_token   = var.name
  encrypted        = true
  kms_key_id       = var.kms_key_arn
  performance_mode = "generalPurpose"
  throughput_mode  = "elastic" # pay per byte read; cold starts read GBs in bursts, then nothing for hours

  tags = merge(var.tags, { Name = var.name })
}

resource "aws_efs_mount_target" "this" {
  for_each = var.subnets

  region          = var.region
  file_system_id  = aws_efs_file_system.this.id
  subnet_id       = each.value
  security_groups = var.security_group_ids
}

resource "aws_efs_access_point" "this" {
  region         = var.region
  file_system_id = aws_efs_file_system.this.id

  posix_user {
    uid = var.posix_uid
    gid = var.posix_gid
  }

  root_directory {
    path = var.access_point_path

    creation_info {
      owner_uid   = var.posix_uid
      owner_gid   = var.posix_gid
      permissions = var.root_permissions
    }
  }

  tags = merge(var.tags, { Name = var.name })
}

data "aws_iam_policy_document" "this" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["*"]
    resources = [aws_efs_file_system.this.arn]

    principals {
      type        = "AWS"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  dynamic "statement" {
    for_each = length(var.read_only_role_arns) > 0 ? [1] : []

    content {
      sid       = "ReadOnlyThroughAccessPoint"
      actions   = ["elasticfilesystem:ClientMount"]
      resources = [aws_efs_file_system.this.arn]

      principals {
        type        = "AWS"
        identifiers = var.read_only_role_arns
      }

      condition {
        test     = "StringEquals"
        variable = "elasticfilesystem:AccessPointArn"
        values   = [aws_efs_access_point.this.arn]
      }
    }
  }

  dynamic "statement" {
    for_each = length(var.read_write_role_arns) > 0 ? [1] : []

    content {
      sid       = "ReadWriteThroughAccessPoint"
      actions   = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"]
      resources = [aws_efs_file_system.this.arn]

      principals {
        type        = "AWS"
        identifiers = var.read_write_role_arns
      }

      condition {
        test     = "StringEquals"
        variable = "elasticfilesystem:AccessPointArn"
        values   = [aws_efs_access_point.this.arn]
      }
    }
  }
}

resource "aws_efs_file_system_policy" "this" {
  region         = var.region
  file_system_id = aws_efs_file_system.this.id
  policy         = data.aws_iam_policy_document.this.json
}
