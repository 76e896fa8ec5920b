"""The analyze phase: CPU only, straight from the store, never loads a model.

One analysis per module (calibration, dead, redundancy, salience); ``runner`` applies them to the selected
runs and writes their tables.
"""
