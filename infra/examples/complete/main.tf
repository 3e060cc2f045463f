provider "aws" {
  region = var.region
}

# Alarms go to a topic of this example; subscribe an address to it after apply. It is encrypted with the
# stack's key, whose policy lets CloudWatch publish; with the AWS managed alias/aws/sns key CloudWatch
# could not, and the alarms would never arrive.
resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = module.sd_lambda.kms_key_arn

  tags = var.tags
}

module "sd_lambda" {
  source = "../.."

  name      = var.name
  region    = var.region
  tags      = var.tags
  image_uri = var.image_uri

  model_name           = "segmind--tiny-sd"
  memory_size          = var.memory_size
  timeout              = 900
  reserved_concurrency = var.reserved_concurrency
  environment_variables = {
    SD_MAX_STEPS = "30"
  }

  create_alarms       = true
  alarm_sns_topic_arn = aws_sns_topic.alarms.arn

  # POST /jobs for long work (docs/jobs.md): results under jobs/ of the weights bucket for 3 days.
  jobs_enabled         = true
  jobs_expiration_days = 3
}
