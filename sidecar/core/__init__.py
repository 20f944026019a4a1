"""The pure decision core: no I/O, no asyncio. Everything here is tested as tables."""
