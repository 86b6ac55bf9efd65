from cladnet.cli import main

main()
