variable "name" {
  description = "Name prefix of every resource."
  type        = string
  default     = "sd-baked"
}

variable "region" {
  description = "AWS region."
  type        = string
  default     = "us-east-1"
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
  default     = { Example = "baked" }
}

variable "weights_source" {
  description = "Read by `make apply INFRA=infra/examples/baked` to know the image must carry the model; this example always passes \"image\" to the module."
  type        = string
  default     = "image"

  validation {
    condition     = var.weights_source == "image"
    error_message = "This example bakes the model into the image: weights_source must be \"image\" (use infra/examples/complete for EFS)."
  }
}

variable "image_uri" {
  description = "Function image with the model baked in, pinned by digest. Null: only the repository and its surroundings."
  type        = string
  default     = null
}

variable "memory_size" {
  description = "Function memory in MB."
  type        = number
  default     = 10240
}

variable "reserved_concurrency" {
  description = "Reserved concurrency (cost cap); null: none."
  type        = number
  default     = null
}

variable "jobs_enabled" {
  description = "Serve POST /jobs (results in the stack's bucket)."
  type        = bool
  default     = true
}
