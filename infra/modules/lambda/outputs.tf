output "repository_url" {
  description = "URL of the ECR repository (push the image here, then pin its digest in image_uri)."
  value       = aws_ecr_repository.this.repository_url
}

output "repository_arn" {
  description = "ARN of the ECR repository."
  value       = aws_ecr_repository.this.arn
}

output "function_name" {
  description = "Name of the function (null until image_uri is set)."
  value       = try(aws_lambda_function.this[0].function_name, null)
}

output "function_arn" {
  description = "ARN of the function (null until image_uri is set)."
  value       = try(aws_lambda_function.this[0].arn, null)
}

output "image_uri" {
  description = "Image the function runs, pinned by digest (null until image_uri is set). The deploy driver keeps it when no new image is given."
  value       = try(aws_lambda_function.this[0].image_uri, null)
}

output "function_url" {
  description = "IAM-authenticated (SigV4) URL of the function (null until image_uri is set)."
  value       = try(aws_lambda_function_url.this[0].function_url, null)
}

output "role_arn" {
  description = "ARN of the function's execution role."
  value       = aws_iam_role.this.arn
}

output "log_group_name" {
  description = "CloudWatch log group of the function."
  value       = aws_cloudwatch_log_group.this.name
}

output "invoker_policy_json" {
  description = "Identity policy that lets a principal call the function URL (lambda:InvokeFunctionUrl and lambda:InvokeFunction)."
  value       = data.aws_iam_policy_document.invoker.json
}

output "environment_variables" {
  description = "Environment of the function, including MODEL_ROOT and MODEL_NAME."
  value       = local.environment
}

output "jobs_prefix" {
  description = "Key prefix of the job objects in the jobs bucket (null when jobs are off)."
  value       = local.jobs_enabled ? var.jobs_prefix : null
}
