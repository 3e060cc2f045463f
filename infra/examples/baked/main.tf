provider "aws" {
  region = var.region
}

# The model lives in the function image (`make build-image MODEL_DIR=...` or `make apply
# INFRA=infra/examples/baked MODEL=owner/name@rev`): no EFS, no seeder, no SSM endpoints and, with
# vpc_enabled left null, no VPC either. Jobs reach S3 and the Lambda API at their public endpoints.
module "sd_lambda" {
  source = "../.."

  name      = var.name
  region    = var.region
  tags      = var.tags
  image_uri = var.image_uri

  weights_source = var.weights_source # always "image" (validated): what `make apply` reads

  memory_size          = var.memory_size
  timeout              = 900
  reserved_concurrency = var.reserved_concurrency
  environment_variables = {
    SD_MAX_STEPS = "30"
  }

  # POST /jobs for long work (docs/jobs.md): results under jobs/ of the stack's bucket for 3 days.
  jobs_enabled         = var.jobs_enabled
  jobs_expiration_days = 3
}
