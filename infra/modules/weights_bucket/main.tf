# Always read, whatever var.create says, so it carries the check a count = 0 bucket would never run.
data "aws_partition" "current" {
  lifecycle {
    precondition {
      condition     = var.create || var.bucket_name != null
      error_message = "With create = false (root stack: create_weights_bucket = false), bucket_name (root stack: weights_bucket_name) must name the existing bucket."
    }
  }
}

locals {
  bucket_name = var.create ? aws_s3_bucket.this[0].id : var.bucket_name
  # A bucket's ARN is its name (bucket names are global): with a given name the policies that name the
  # bucket are known at plan time, and reviewable there.
  bucket_arn = var.create && var.bucket_name == null ? aws_s3_bucket.this[0].arn : "arn:${data.aws_partition.current.partition}:s3:::${var.bucket_name}"
}

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_18:The bucket only holds model weights that operators upload and the seeder reads; access logs would need a second bucket and hold nothing confidential to audit.
  #checkov:skip=CKV_AWS_144:Weights are copies of model artifacts that can be uploaded again from their source; cross-region replication would double storage for no recovery gain.
  #checkov:skip=CKV2_AWS_62:Nothing reacts to new weights: seeding is an explicit operator step, so event notifications would have no consumer.
  count = var.create ? 1 : 0

  region        = var.region
  bucket        = var.bucket_name
  bucket_prefix = var.bucket_name == null ? var.bucket_prefix : null
  force_destroy = var.force_destroy

  tags = var.tags
}

resource "aws_s3_bucket_ownership_controls" "this" {
  count = var.create ? 1 : 0

  region = var.region
  bucket = aws_s3_bucket.this[0].id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  count = var.create ? 1 : 0

  region                  = var.region
  bucket                  = aws_s3_bucket.this[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  count = var.create ? 1 : 0

  region = var.region
  bucket = aws_s3_bucket.this[0].id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  count = var.create ? 1 : 0

  region = var.region
  bucket = aws_s3_bucket.this[0].id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  count = var.create ? 1 : 0

  region = var.region
  bucket = aws_s3_bucket.this[0].id

  rule {
    id     = "tidy-versions-and-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }

  # Job requests and results are scratch: they expire, and their old versions go the next day. Where
  # two rules' filters overlap, S3 honours the shorter expiration, so this rule wins under its prefix.
  # https://docs.aws.amazon.com/AmazonS3/latest/userguide/lifecycle-conflicts.html
  dynamic "rule" {
    for_each = var.expiring_prefix != null ? [var.expiring_prefix] : []

    content {
      id     = "expire-${trimsuffix(replace(rule.value, "/", "-"), "-")}"
      status = "Enabled"

      filter {
        prefix = rule.value
      }

      expiration {
        days = var.expiring_prefix_days
      }

      noncurrent_version_expiration {
        noncurrent_days = 1
      }

      abort_incomplete_multipart_upload {
        days_after_initiation = 1
      }
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

data "aws_iam_policy_document" "this" {
  count = var.create ? 1 : 0

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this[0].arn, "${aws_s3_bucket.this[0].arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  count = var.create ? 1 : 0

  region = var.region
  bucket = aws_s3_bucket.this[0].id
  policy = data.aws_iam_policy_document.this[0].json

  depends_on = [aws_s3_bucket_public_access_block.this]
}
