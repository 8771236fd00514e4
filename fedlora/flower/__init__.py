"""Flower glue: the ServerApp, the ClientApp, the Grid transport and the simulation launch.

With ``fedlora.cli`` (which launches simulations and deployments), the only code that imports flwr.
"""
