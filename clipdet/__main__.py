"""python -m clipdet"""

from .cli import main

main()
