# The AMIs: engine, Kafka and Redis, each baked by the same Ansible role as a deploy
# (deploy/ansible/site.yml) with <role>_image_build=true: an image holds what is slow to
# install, and the deploy playbooks add the per-host configuration and secrets.
#   engine: the ingest engine (votes serve) in a virtualenv under /opt/votes/<version>
#   kafka:  Java, the Kafka release under /opt/kafka/<version>, the unit; not formatted
#   redis:  Redis from Debian, not configured
# Build from the repository root, one image or all:
#   packer build -only=engine.amazon-ebs.engine deploy/packer/images.pkr.hcl
#   packer build deploy/packer/images.pkr.hcl
# (a Packer newer than 1.6 first needs: packer init deploy/packer/plugins.pkr.hcl)

variable "region" {
  type        = string
  description = "AWS region the images are built in (copy them elsewhere with ami_regions)."
  default     = "eu-west-1"
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

variable "engine_instance_type" {
  type        = string
  description = "The engine's build instance; the image runs on any type of the same architecture."
  default     = "c7i.xlarge"
}

variable "kafka_instance_type" {
  type        = string
  description = "The Kafka build instance."
  default     = "i4i.xlarge"
}

variable "redis_instance_type" {
  type        = string
  description = "The Redis build instance."
  default     = "r7i.large"
}

variable "votes_service_version" {
  type        = string
  description = "The votes-engine release baked into the image (/opt/votes/<version>)."
  default     = "0.1.0"
}

variable "votes_service_wheel_path" {
  type        = string
  description = "The engine wheel on the build machine (pip wheel --no-deps -w dist .)."
  default     = "dist/votes_engine-0.1.0-cp311-cp311-linux_x86_64.whl"
}

variable "kafka_version" {
  type        = string
  description = "The Kafka release baked into the image (/opt/kafka/<version>)."
  default     = "4.1.2"
}

variable "redis_image_version" {
  type        = string
  description = "A label for the Redis image (Redis itself comes from Debian)."
  default     = "1"
}

locals {
  build_stamp = formatdate("YYYYMMDDhhmmss", timestamp())
  # The ansible provisioner of every image: the role of its host group, from site.yml.
  playbook_file = "${path.root}/../ansible/site.yml"
  ansible_env   = ["ANSIBLE_CONFIG=${path.root}/../ansible/ansible.cfg"]
}

# What every image shares: the region, Debian's newest base image, an encrypted root volume.
# Each build below names its image, instance type and tags (Packer 1.6 lets a build add
# arguments to a source, not replace them, so those stay out of here).
source "amazon-ebs" "debian" {
  region       = var.region
  ssh_username = "admin"
  encrypt_boot = true

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
}

build {
  name = "engine"
  source "source.amazon-ebs.debian" {
    name          = "engine"
    instance_type = var.engine_instance_type
    ami_name      = "votes-engine-${var.votes_service_version}-${local.build_stamp}"
    tags = {
      Name    = "votes-engine"
      Role    = "engine"
      Version = var.votes_service_version
      Base    = "{{ .SourceAMIName }}"
    }
  }

  provisioner "ansible" {
    playbook_file    = local.playbook_file
    groups           = ["engine"]
    user             = "admin"
    ansible_env_vars = local.ansible_env
    extra_arguments  = ["--extra-vars", "votes_service_image_build=true votes_service_version=${var.votes_service_version} votes_service_wheel_path=${abspath(var.votes_service_wheel_path)}"]
  }
}

build {
  name = "kafka"
  source "source.amazon-ebs.debian" {
    name          = "kafka"
    instance_type = var.kafka_instance_type
    ami_name      = "votes-kafka-${var.kafka_version}-${local.build_stamp}"
    tags = {
      Name    = "votes-kafka"
      Role    = "kafka"
      Version = var.kafka_version
      Base    = "{{ .SourceAMIName }}"
    }
  }

  provisioner "ansible" {
    playbook_file    = local.playbook_file
    groups           = ["kafka"]
    user             = "admin"
    ansible_env_vars = local.ansible_env
    extra_arguments  = ["--extra-vars", "kafka_image_build=true kafka_version=${var.kafka_version}"]
  }
}

build {
  name = "redis"
  source "source.amazon-ebs.debian" {
    name          = "redis"
    instance_type = var.redis_instance_type
    ami_name      = "votes-redis-${var.redis_image_version}-${local.build_stamp}"
    tags = {
      Name    = "votes-redis"
      Role    = "redis"
      Version = var.redis_image_version
      Base    = "{{ .SourceAMIName }}"
    }
  }

  provisioner "ansible" {
    playbook_file    = local.playbook_file
    groups           = ["redis"]
    user             = "admin"
    ansible_env_vars = local.ansible_env
    extra_arguments  = ["--extra-vars", "redis_image_build=true"]
  }
}
