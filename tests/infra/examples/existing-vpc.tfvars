# Stand-in ids for planning infra/examples/existing-vpc offline (`make plan-offline`, tests).
# No S3 gateway endpoint: the default leaves the caller's route tables alone.
region                     = "eu-central-1"
vpc_id                     = "vpc-0a1b2c3d4e5f60718"
private_subnet_ids         = ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002"]
weights_bucket_name        = "acme-model-weights"
weights_bucket_kms_key_arn = "arn:aws:kms:eu-central-1:123456789012:key/0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
image_uri                  = "123456789012.dkr.ecr.eu-central-1.amazonaws.com/sd-lambda@sha256:0b2f3a0c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8"
