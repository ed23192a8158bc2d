"""Imported first by each Python-docs example run_docs_examples.py runs on
dpool: the stdlib names the examples use give dpool's classes."""
import concurrent.futures
import multiprocessing

import dpool
import dpool.futures

multiprocessing.Pool = dpool.Pool
concurrent.futures.ProcessPoolExecutor = dpool.futures.Executor
