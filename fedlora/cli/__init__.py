"""The console commands: fedlora, fedlora-deploy, fedlora-certs."""
