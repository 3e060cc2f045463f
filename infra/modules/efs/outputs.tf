output "file_system_id" {
  description = "Id of the file system."
  value       = aws_efs_file_system.this.id
}

output "file_system_arn" {
  description = "ARN of the file system."
  value       = aws_efs_file_system.this.arn
}

# The access point outputs wait for the mount targets and the policy: a client that mounts as soon as
# it has the access point (the function, the seeder) must find both in place.
output "access_point_id" {
  description = "Id of the access point; available once every mount target and the file-system policy exist."
  value       = aws_efs_access_point.this.id

  depends_on = [aws_efs_mount_target.this, aws_efs_file_system_policy.this]
}

output "access_point_arn" {
  description = "ARN of the access point; available once every mount target and the file-system policy exist."
  value       = aws_efs_access_point.this.arn

  depends_on = [aws_efs_mount_target.this, aws_efs_file_system_policy.this]
}

output "mount_target_ids" {
  description = "Ids of the mount targets, by the keys of var.subnets."
  value       = { for key, target in aws_efs_mount_target.this : key => target.id }
}

output "dns_name" {
  description = "DNS name of the file system."
  value       = aws_efs_file_system.this.dns_name
}
