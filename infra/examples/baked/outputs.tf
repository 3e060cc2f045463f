output "function_url" {
  description = "IAM-authenticated function URL."
  value       = module.sd_lambda.function_url
}

output "function_name" {
  description = "Name of the function."
  value       = module.sd_lambda.function_name
}

output "ecr_repository_url" {
  description = "Repository to push the baked image to."
  value       = module.sd_lambda.ecr_repository_url
}

output "image_uri" {
  description = "Image the function runs, pinned by digest; `make apply` keeps it when no new image is given."
  value       = module.sd_lambda.image_uri
}

output "weights_source" {
  description = "Always \"image\" here: seeding refuses, `make rollback` redeploys an earlier image."
  value       = module.sd_lambda.weights_source
}

output "invoker_policy_json" {
  description = "Identity policy for callers of the function URL."
  value       = module.sd_lambda.invoker_policy_json
}

output "region" {
  description = "Region of the stack."
  value       = module.sd_lambda.region
}
