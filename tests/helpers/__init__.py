"""Builders shared by several test files (tiny models, data, fakes); importable as
``helpers.<module>`` because pytest puts ``tests/`` (the directory of the root conftest) on the
import path. No test lives here."""
