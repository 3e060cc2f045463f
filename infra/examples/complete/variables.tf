variable "name" {
  description = "Name prefix of every resource."
  type        = string
  default     = "sd-lambda-demo"
}

variable "region" {
  description = "AWS region to deploy to."
  type        = string
  default     = "us-east-1"
}

variable "image_uri" {
  description = "Function image pinned by digest (<ecr_repository_url>@sha256:<digest>). Null on the first apply, which creates the repository."
  type        = string
  default     = null
}

variable "memory_size" {
  description = "Function memory in MB (new accounts: at most 3008 until a quota increase)."
  type        = number
  default     = 10240
}

variable "reserved_concurrency" {
  description = "Cost cap: at most this many parallel (billed) invocations. Null: no reservation; AWS refuses one that leaves the account fewer than 100 unreserved executions."
  type        = number
  default     = null
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
  default = {
    Project     = "sd-lambda"
    Environment = "demo"
  }
}
