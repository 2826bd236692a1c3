"""Act on a NixOS host: the gated deploy, switch modes, reboot and kexec."""
