"""Pipeline stages: one class per stage (flows/stages/contract.py), run by flows/stages/runner.py.

Every module here is imported to find the stages (contract.discover); a new module with a Stage
subclass is a new stage, placed in the DAG by the tables it reads and writes.
"""
