# Packer newer than 1.6 ships no builders or provisioners: `packer init plugins.pkr.hcl`
# installs these before a build. Packer 1.6.6 (Debian's, which deploy/check.sh uses) has both
# built in and cannot parse required_plugins, so check.sh formats this file but does not
# validate it, and the templates do not include it.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
    ansible = {
      version = ">= 1.1.0"
      source  = "github.com/hashicorp/ansible"
    }
  }
}
