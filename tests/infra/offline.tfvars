# Realistic variables for planning infra/ offline (`make plan-offline`, tests/infra/test_stack_plan.py).
name                 = "sd-plan"
region               = "eu-west-1"
image_uri            = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sd-plan@sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
model_name           = "segmind--tiny-sd"
memory_size          = 6144
timeout              = 600
reserved_concurrency = 3
ssh_ingress_cidrs    = ["203.0.113.0/24"]
create_alarms        = true
alarm_sns_topic_arn  = "arn:aws:sns:eu-west-1:123456789012:sd-plan-alarms"

environment_variables = {
  SD_MAX_STEPS = "25"
  SD_THREADS   = "6"
}

tags = {
  Project    = "sd-lambda"
  CostCenter = "ml-platform"
}
