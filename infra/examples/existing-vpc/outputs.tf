output "function_url" {
  description = "IAM-authenticated function URL."
  value       = module.sd_lambda.function_url
}

output "ecr_repository_url" {
  description = "Repository to push the image to."
  value       = module.sd_lambda.ecr_repository_url
}

output "weights_bucket_name" {
  description = "Bucket the seeder reads weights from."
  value       = module.sd_lambda.weights_bucket_name
}

output "seeder_instance_id" {
  description = "Seeder instance id."
  value       = module.sd_lambda.seeder_instance_id
}

output "invoker_policy_json" {
  description = "Identity policy for callers of the function URL."
  value       = module.sd_lambda.invoker_policy_json
}
