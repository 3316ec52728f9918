"""What tests of several kinds share: the real servers, the whole running loop, the loop
closed in memory, and sample inputs. Fixtures are in tests/conftest.py; test modules
import helpers from here, never from one another."""
