provider "aws" {
  region = var.region
}

# Alarms go to a topic of this example; subscribe an address to it after apply.
resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = "alias/aws/sns"

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
  reserved_concurrency = 2
  environment_variables = {
    SD_MAX_STEPS = "30"
  }

  create_alarms       = true
  alarm_sns_topic_arn = aws_sns_topic.alarms.arn
}
