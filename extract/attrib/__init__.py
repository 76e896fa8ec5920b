"""Attribution: Integrated Gradients (Captum-equivalent, cached layer replay) and
re-attribution of stored runs.
"""
