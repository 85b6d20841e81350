# The kafka AMI: a Kafka KRaft node (Java, the Kafka release, the systemd unit), not formatted.
# The same Ansible role as a deploy (deploy/ansible/site.yml, group "kafka") with
# kafka_image_build=true: the image holds what is slow to install, and the deploy playbook
# adds the per-host configuration and secrets. Build from the repository root:
#   packer build deploy/packer/kafka.pkr.hcl
# (a Packer newer than 1.6 first needs: packer init deploy/packer/plugins.pkr.hcl)

variable "region" {
  type        = string
  description = "AWS region the image is built in (copy it elsewhere with ami_regions)."
  default     = "eu-west-1"
}

variable "instance_type" {
  type        = string
  description = "The build instance; the image runs on any type of the same architecture."
  default     = "i4i.xlarge"
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

variable "kafka_version" {
  type        = string
  description = "The Kafka release baked into the image (/opt/kafka/<version>)."
  default     = "4.1.2"
}

locals {
  build_stamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "kafka" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "admin"
  ami_name      = "votes-kafka-${var.kafka_version}-${local.build_stamp}"
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
    Name    = "votes-kafka"
    Role    = "kafka"
    Version = var.kafka_version
    Base    = "{{ .SourceAMIName }}"
  }
}

build {
  sources = ["source.amazon-ebs.kafka"]

  provisioner "ansible" {
    playbook_file    = "${path.root}/../ansible/site.yml"
    groups           = ["kafka"]
    user             = "admin"
    ansible_env_vars = ["ANSIBLE_CONFIG=${path.root}/../ansible/ansible.cfg"]
    extra_arguments  = ["--extra-vars", "kafka_image_build=true kafka_version=${var.kafka_version}"]
  }
}
