# Security group rules moved into one for_each resource per direction: keep existing rules in place.
# (Operator-supplied SSH and HTTPS CIDR rules are keyed by CIDR and are recreated once.)

moved {
  from = aws_vpc_security_group_ingress_rule.efs_from_lambda
  to   = aws_vpc_security_group_ingress_rule.this["efs_from_lambda"]
}

moved {
  from = aws_vpc_security_group_ingress_rule.efs_from_seeder
  to   = aws_vpc_security_group_ingress_rule.this["efs_from_seeder"]
}

moved {
  from = aws_vpc_security_group_ingress_rule.endpoints_from_seeder[0]
  to   = aws_vpc_security_group_ingress_rule.this["endpoints_from_seeder"]
}

moved {
  from = aws_vpc_security_group_egress_rule.lambda_to_efs
  to   = aws_vpc_security_group_egress_rule.this["lambda_to_efs"]
}

moved {
  from = aws_vpc_security_group_egress_rule.seeder_to_efs
  to   = aws_vpc_security_group_egress_rule.this["seeder_to_efs"]
}

moved {
  from = aws_vpc_security_group_egress_rule.seeder_to_s3
  to   = aws_vpc_security_group_egress_rule.this["seeder_to_s3"]
}

moved {
  from = aws_vpc_security_group_egress_rule.seeder_to_endpoints[0]
  to   = aws_vpc_security_group_egress_rule.this["seeder_to_endpoints"]
}

# efs_enabled made the EFS and seeder groups optional.
moved {
  from = aws_security_group.efs
  to   = aws_security_group.efs[0]
}

moved {
  from = aws_security_group.seeder
  to   = aws_security_group.seeder[0]
}
