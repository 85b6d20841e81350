# The engine AMI: the ingest engine (votes serve) installed under /opt/votes/<version>, not configured.
# The same Ansible role as a deploy (deploy/ansible/site.yml, group "engine") with
# engine_image_build=true: the image holds what is slow to install, and the deploy playbook
# adds the per-host configuration and secrets. Build from the repository root:
#   packer build deploy/packer/engine.pkr.hcl
# (a Packer newer than 1.6 first needs: packer init deploy/packer/plugins.pkr.hcl)

variable "region" {
  type        = string
  description = "AWS region the image is built in (copy it elsewhere with ami_regions)."
  default     = "eu-west-1"
}

variable "instance_type" {
  type        = string
  description = "The build instance; the image runs on any type of the same architecture."
  default     = "c7i.xlarge"
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

variable "engine_version" {
  type        = string
  description = "The votes-engine release baked into the image (/opt/votes/<version>)."
  default     = "0.1.0"
}

variable "engine_wheel_path" {
  type        = string
  description = "The engine wheel on the build machine (pip wheel --no-deps -w dist .)."
  default     = "dist/votes_engine-0.1.0-cp311-cp311-linux_x86_64.whl"
}

locals {
  build_stamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "engine" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "admin"
  ami_name      = "votes-engine-${var.engine_version}-${local.build_stamp}"
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
    Name    = "votes-engine"
    Role    = "engine"
    Version = var.engine_version
    Base    = "{{ .SourceAMIName }}"
  }
}

build {
  sources = ["source.amazon-ebs.engine"]

  provisioner "ansible" {
    playbook_file    = "${path.root}/../ansible/site.yml"
    groups           = ["engine"]
    user             = "admin"
    ansible_env_vars = ["ANSIBLE_CONFIG=${path.root}/../ansible/ansible.cfg"]
    extra_arguments  = ["--extra-vars", "engine_image_build=true engine_version=${var.engine_version} engine_wheel_path=${abspath(var.engine_wheel_path)}"]
  }
}
