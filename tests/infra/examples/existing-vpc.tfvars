# Stand-in ids for planning infra/examples/existing-vpc offline (`make plan-offline`, tests).
region                  = "eu-central-1"
vpc_id                  = "vpc-0a1b2c3d4e5f60718"
private_subnet_ids      = ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002"]
private_route_table_ids = ["rtb-0a1b2c3d4e5f60003"]
weights_bucket_name     = "acme-model-weights"
image_uri               = "123456789012.dkr.ecr.eu-central-1.amazonaws.com/sd-lambda@sha256:0b2f3a0c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8"
