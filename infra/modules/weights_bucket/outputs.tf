output "bucket_name" {
  description = "Name of the weights bucket (new or existing)."
  value       = local.bucket_name
}

output "bucket_arn" {
  description = "ARN of the weights bucket (new or existing)."
  value       = local.bucket_arn
}

output "bucket_created" {
  description = "Whether this module created (and so manages) the bucket."
  value       = var.create
}
