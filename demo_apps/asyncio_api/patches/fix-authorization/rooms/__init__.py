"""A chat-room service on asyncio streams (demo for livepatch)."""
