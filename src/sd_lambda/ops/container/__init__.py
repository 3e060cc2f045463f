"""The Lambda container image: its pinned requirements, the docker build and the push to ECR."""
