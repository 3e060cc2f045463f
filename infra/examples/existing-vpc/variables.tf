variable "name" {
  description = "Name prefix of every resource."
  type        = string
  default     = "sd-lambda"
}

variable "region" {
  description = "AWS region of the existing VPC."
  type        = string
}

variable "vpc_id" {
  description = "Existing VPC."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets of the VPC in at least two availability zones; the first hosts the seeder."
  type        = list(string)
}

variable "create_s3_endpoint" {
  description = "Add an S3 gateway endpoint to private_route_table_ids. This changes your routing: every S3 request from those subnets then goes through the endpoint. False: the VPC must already reach S3 (NAT or an existing endpoint)."
  type        = bool
  default     = false
}

variable "private_route_table_ids" {
  description = "Route tables that get the S3 gateway endpoint's route (create_s3_endpoint = true only)."
  type        = list(string)
  default     = []
}

variable "s3_endpoint_policy" {
  description = "JSON policy of the S3 gateway endpoint (create_s3_endpoint = true). Null: AWS's default full access."
  type        = string
  default     = null
}

variable "create_ssm_endpoints" {
  description = "Create SSM interface endpoints; set false if the VPC already has them (private DNS would clash)."
  type        = bool
  default     = true
}

variable "seeder_https_egress_cidrs" {
  description = "Where the seeder reaches the VPC's existing SSM endpoints on 443 (e.g. the VPC CIDR); required when create_ssm_endpoints = false."
  type        = list(string)
  default     = []
}

variable "weights_bucket_name" {
  description = "Existing bucket holding the weights under models/. Null: create one."
  type        = string
  default     = null
}

variable "weights_bucket_kms_key_arn" {
  description = "Customer managed KMS key of the existing weights bucket, if it has one (the seeder gets kms:Decrypt on it)."
  type        = string
  default     = null
}

variable "image_uri" {
  description = "Function image pinned by digest. Null on the first apply, which creates the repository."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
  default = {
    Project = "sd-lambda"
  }
}
