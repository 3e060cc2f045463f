# Planning infra/examples/complete offline with the function (`make plan-offline`, tests).
image_uri = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sd-lambda-demo@sha256:9c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b"
