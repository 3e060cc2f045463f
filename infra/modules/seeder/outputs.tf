output "instance_id" {
  description = "Id of the seeder instance (null when create = false)."
  value       = try(aws_instance.this[0].id, null)
}

output "role_arn" {
  description = "ARN of the seeder's IAM role (null when create = false)."
  value       = try(aws_iam_role.this[0].arn, null)
}

output "role_name" {
  description = "Name of the seeder's IAM role (null when create = false)."
  value       = try(aws_iam_role.this[0].name, null)
}

output "mount_path" {
  description = "Where the EFS access point is mounted on the instance."
  value       = var.mount_path
}
