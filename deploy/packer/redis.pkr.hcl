# The redis AMI: Redis from Debian, not configured.
# The same Ansible role as a deploy (deploy/ansible/site.yml, group "redis") with
# redis_image_build=true: the image holds what is slow to install, and the deploy playbook
# adds the per-host configuration and secrets. Build from the repository root:
#   packer build deploy/packer/redis.pkr.hcl
# (a Packer newer than 1.6 first needs: packer init deploy/packer/plugins.pkr.hcl)

variable "region" {
  type        = string
  description = "AWS region the image is built in (copy it elsewhere with ami_regions)."
  default     = "eu-west-1"
}

variable "instance_type" {
  type        = string
  description = "The build instance; the image runs on any type of the same architecture."
  default     = "r7i.large"
}

variable "base_image_filter" {
  type        = string
  description = "Name filter of the base AMI (Debian's official images)."
  default     = "debian-12-amd64-*"
}

variable "base_image_owner" {
  type        = string
  description = "Account that publishes the base AMI (Debian's)."
  default     = "136693071363"
}

variable "redis_image_version" {
  type        = string
  description = "A label for this image (Redis itself comes from Debian).'"
  default     = "1"
}

locals {
  build_stamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "redis" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "admin"
  ami_name      = "votes-redis-${var.redis_image_version}-${local.build_stamp}"
  encrypt_boot  = true

  source_ami_filter {
    filters = {
      name                = var.base_image_filter
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = [var.base_image_owner]
    most_recent = true
  }

  tags = {
    Name    = "votes-redis"
    Role    = "redis"
    Version = var.redis_image_version
    Base    = "{{ .SourceAMIName }}"
  }
}

build {
  sources = ["source.amazon-ebs.redis"]

  provisioner "ansible" {
    playbook_file    = "${path.root}/../ansible/site.yml"
    groups           = ["redis"]
    user             = "admin"
    ansible_env_vars = ["ANSIBLE_CONFIG=${path.root}/../ansible/ansible.cfg"]
    extra_arguments  = ["--extra-vars", "redis_image_build=true"]
  }
}
