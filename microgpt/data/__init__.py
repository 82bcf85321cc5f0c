"""The data: a file of names, its token store and seeded split, rows and batches, and the DataModule
(``datamodule.py``) that hands them to Lightning."""
