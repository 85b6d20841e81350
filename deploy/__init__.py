"""Deployment: the real local stack (deploy/local/), and later the fleet's Ansible and Packer."""
