"""The phases a run is made of, one module each, in the order a plan lists them (``pipeline.plan``)."""
