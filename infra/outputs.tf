# The names of these outputs are a contract: the seeding driver, `make invoke` and the deploy driver
# read them with `terraform output -json` (sd_lambda.ops.stack_outputs). Named <thing>_<attr>.

################################################################################
# Function
################################################################################

output "function_url" {
  description = "IAM-authenticated function URL; requests must be SigV4-signed for service lambda (null until image_uri is set)."
  value       = module.lambda.function_url
}

output "function_name" {
  description = "Name of the function (null until image_uri is set)."
  value       = module.lambda.function_name
}

output "function_arn" {
  description = "ARN of the function (null until image_uri is set)."
  value       = module.lambda.function_arn
}

output "function_role_arn" {
  description = "ARN of the function's execution role."
  value       = module.lambda.role_arn
}

output "function_log_group_name" {
  description = "CloudWatch log group of the function."
  value       = module.lambda.log_group_name
}

output "image_uri" {
  description = "Image the function runs, pinned by digest (null until image_uri is set); `make plan/apply` reuse it when no new image is given."
  value       = module.lambda.image_uri
}

output "invoker_policy_json" {
  description = "Identity policy to attach to whoever calls the function URL (see also invoker_principals)."
  value       = module.lambda.invoker_policy_json
}

output "jobs_prefix" {
  description = "Key prefix of the job objects in the weights bucket (null when jobs_enabled = false)."
  value       = module.lambda.jobs_prefix
}

output "lambda_endpoint_id" {
  description = "Id of the Lambda API interface endpoint the function starts its jobs through (null when jobs_enabled = false or without a VPC: the function then uses the public endpoint)."
  value       = one(module.network[*].lambda_endpoint_id)
}

output "model_name" {
  description = "Slug of the served model (MODEL_NAME); null with weights_source = \"image\", whose image sets MODEL_NAME itself."
  value       = local.weights_on_efs ? var.model_name : null
}

output "model_root" {
  description = "Where the function mounts the access point (MODEL_ROOT); null with weights_source = \"image\", whose image sets MODEL_ROOT (/opt/models)."
  value       = local.weights_on_efs ? local.mount_path : null
}

output "weights_source" {
  description = "Where the function reads the model: \"efs\" or \"image\". The operator tools read it (seeding refuses \"image\"; rollback then redeploys an earlier image)."
  value       = var.weights_source
}

output "vpc_enabled" {
  description = "Whether the function runs in a VPC."
  value       = local.vpc_enabled
}

################################################################################
# Image repository
################################################################################

output "ecr_repository_url" {
  description = "ECR repository to push the function image to."
  value       = module.lambda.repository_url
}

output "ecr_repository_arn" {
  description = "ARN of the ECR repository."
  value       = module.lambda.repository_arn
}

################################################################################
# Weights and seeding
################################################################################

output "weights_bucket_name" {
  description = "S3 bucket the seeder copies weights from."
  value       = module.weights_bucket.bucket_name
}

output "weights_bucket_arn" {
  description = "ARN of the weights bucket."
  value       = module.weights_bucket.bucket_arn
}

output "weights_prefix" {
  description = "Key prefix of the weights in the bucket (the seeder can read nothing else)."
  value       = local.weights_prefix
}

output "seeder_instance_id" {
  description = "Id of the seeder instance (null when create_seeder = false or weights_source = \"image\")."
  value       = module.seeder.instance_id
}

output "seeder_role_arn" {
  description = "ARN of the seeder's IAM role (null when create_seeder = false or weights_source = \"image\")."
  value       = module.seeder.role_arn
}

output "seeder_mount_path" {
  description = "Where the seeder mounts the EFS access point (null with weights_source = \"image\")."
  value       = local.weights_on_efs ? module.seeder.mount_path : null
}

################################################################################
# File system
################################################################################

output "efs_file_system_id" {
  description = "Id of the EFS file system holding the models (null with weights_source = \"image\")."
  value       = one(module.efs[*].file_system_id)
}

output "efs_file_system_arn" {
  description = "ARN of the EFS file system (null with weights_source = \"image\")."
  value       = one(module.efs[*].file_system_arn)
}

output "efs_access_point_id" {
  description = "Id of the EFS access point (root /models, POSIX user 1000:1000; null with weights_source = \"image\")."
  value       = one(module.efs[*].access_point_id)
}

output "efs_access_point_arn" {
  description = "ARN of the EFS access point (root /models, POSIX user 1000:1000; null with weights_source = \"image\")."
  value       = one(module.efs[*].access_point_arn)
}

################################################################################
# Network
################################################################################

output "vpc_id" {
  description = "Id of the VPC (new or existing; null when vpc_enabled resolves to false)."
  value       = one(module.network[*].vpc_id)
}

output "private_subnet_ids" {
  description = "Private subnets of the function, the EFS mount targets and (the first) the seeder (null without a VPC)."
  value       = one(module.network[*].private_subnet_ids)
}

output "function_security_group_id" {
  description = "Security group of the function's network interfaces (null without a VPC)."
  value       = one(module.network[*].lambda_security_group_id)
}

output "efs_security_group_id" {
  description = "Security group of the EFS mount targets (null with weights_source = \"image\")."
  value       = one(module.network[*].efs_security_group_id)
}

output "seeder_security_group_id" {
  description = "Security group of the seeder instance (null with weights_source = \"image\")."
  value       = one(module.network[*].seeder_security_group_id)
}

################################################################################
# General
################################################################################

output "region" {
  description = "Region of the stack."
  value       = data.aws_region.current.region
}

output "kms_key_arn" {
  description = "KMS key encrypting EFS, the weights bucket, the function's environment and the logs."
  value       = local.kms_key_arn
}
