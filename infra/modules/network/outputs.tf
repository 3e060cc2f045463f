output "vpc_id" {
  description = "Id of the VPC (new or existing)."
  value       = local.vpc_id
}

output "private_subnet_ids" {
  description = "Private subnet ids used by the function, the EFS mount targets and the seeder."
  value       = local.private_subnet_ids
}

output "private_subnets_by_key" {
  description = "The private subnet ids keyed by availability zone (new VPC) or by subnet id (existing VPC): keys known at plan time, for for_each."
  value       = var.create_vpc ? zipmap(local.azs, aws_subnet.private[*].id) : { for id in var.private_subnet_ids : id => id }
}

output "lambda_security_group_id" {
  description = "Security group of the function's network interfaces."
  value       = aws_security_group.lambda.id
}

output "efs_security_group_id" {
  description = "Security group of the EFS mount targets (null when efs_enabled = false)."
  value       = one(aws_security_group.efs[*].id)
}

output "seeder_security_group_id" {
  description = "Security group of the seeder instance, available once the seeder's network paths (routes, S3 and SSM endpoints, rules) exist (null when efs_enabled = false)."
  value       = one(aws_security_group.seeder[*].id)

  # The seeder installs packages and registers with SSM at its first boot: whatever launches it with
  # this group must wait for the paths it uses then.
  depends_on = [
    aws_route_table_association.private,
    aws_vpc_endpoint.s3,
    aws_vpc_endpoint.ssm,
    aws_vpc_security_group_egress_rule.this,
    aws_vpc_security_group_ingress_rule.this,
  ]
}

output "endpoints_security_group_id" {
  description = "Security group of the SSM interface endpoints (null when they are not created)."
  value       = try(aws_security_group.endpoints[0].id, null)
}

output "s3_endpoint_id" {
  description = "Id of the S3 gateway endpoint (null when it is not created)."
  value       = try(aws_vpc_endpoint.s3[0].id, null)
}

output "ssm_endpoint_ids" {
  description = "Ids of the SSM interface endpoints, by service."
  value       = { for service, endpoint in aws_vpc_endpoint.ssm : service => endpoint.id }
}

output "lambda_endpoint_id" {
  description = "Id of the Lambda API interface endpoint (null when it is not created)."
  value       = try(aws_vpc_endpoint.lambda[0].id, null)
}

output "lambda_endpoint_url" {
  description = "https:// URL of the Lambda API interface endpoint's own regional DNS name (null when it is not created)."
  value       = try("https://${aws_vpc_endpoint.lambda[0].dns_entry[0].dns_name}", null)
}
