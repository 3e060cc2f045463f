provider "aws" {
  region = var.region
}

module "sd_lambda" {
  source = "../.."

  name      = var.name
  region    = var.region
  tags      = var.tags
  image_uri = var.image_uri

  vpc_id                  = var.vpc_id
  private_subnet_ids      = var.private_subnet_ids
  create_s3_endpoint      = var.create_s3_endpoint
  private_route_table_ids = var.private_route_table_ids
  s3_endpoint_policy      = var.s3_endpoint_policy
  create_ssm_endpoints    = var.create_ssm_endpoints

  seeder_https_egress_cidrs = var.seeder_https_egress_cidrs

  create_weights_bucket      = var.weights_bucket_name == null
  weights_bucket_name        = var.weights_bucket_name
  weights_bucket_kms_key_arn = var.weights_bucket_kms_key_arn

  memory_size = 3008 # fits a new account's default quota
}
