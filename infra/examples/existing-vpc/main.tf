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
  private_route_table_ids = var.private_route_table_ids
  create_ssm_endpoints    = var.create_ssm_endpoints

  seeder_https_egress_cidrs = var.seeder_https_egress_cidrs

  create_weights_bucket = var.weights_bucket_name == null
  weights_bucket_name   = var.weights_bucket_name

  memory_size          = 3008 # fits a new account's default quota
  reserved_concurrency = 1
}
